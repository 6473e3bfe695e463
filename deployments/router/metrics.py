"""Prometheus metrics of the router, through Ray Serve (app, deployment and replica tags
are added): refusals of known callers per tier and reason."""

from __future__ import annotations

from typing import Any


class RouterMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        tags: Any = ("tier", "reason")  # Ray annotates tag_keys as a one-element tuple
        self.refusals = metrics.Counter(
            "mediagate_refusals",
            description=(
                "Requests of known callers refused (403, 429, 503, and moderation's 400s; "
                "video outputs refused are counted by their worker), per tier and reason "
                "(the error code: insufficient_quota, rate_limit_exceeded, "
                "server_overloaded, moderation_blocked, ...)."
            ),
            tag_keys=tags,
        )

    def refused(self, tier: str, reason: str) -> None:
        self.refusals.inc(tags={"tier": tier, "reason": reason})
