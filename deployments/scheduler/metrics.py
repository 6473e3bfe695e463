"""Prometheus metrics of a scheduler, through Ray Serve (app, deployment and replica tags
are added).
"""

from __future__ import annotations

from typing import Any


def _tags(*names: str) -> Any:
    """Ray annotates ``tag_keys`` as a one-element tuple; any length works."""
    return names


class SchedulerMetrics:
    """Prometheus metrics through Ray Serve (app, deployment and replica tags are added).

    Outside Ray (unit tests, a scheduler built by hand) it records nothing: recording a
    Ray metric there would start, or connect to, a Ray instance."""

    def __init__(self, model: str) -> None:
        import ray
        from ray.serve import metrics

        self.model = model
        self.enabled = ray.is_initialized()
        self.queue_length = metrics.Gauge(
            "mediagate_queue_length",
            description="Requests waiting in the scheduler, per priority class.",
            tag_keys=_tags("model", "priority_class"),
        )
        self.inflight = metrics.Gauge(
            "mediagate_inflight_batches",
            description="Batches (images) or jobs (videos) running on worker slots.",
            tag_keys=("model",),
        )
        self.decisions = metrics.Counter(
            "mediagate_scheduler_decisions",
            description=(
                "Requests admitted, shed at once, expired in the queue, or preempted "
                "(taken back from a worker for higher-priority work), per class."
            ),
            tag_keys=_tags("model", "priority_class", "decision"),
        )

    def decided(self, decision: str, priority_class: int) -> None:
        if not self.enabled:
            return
        tags = {"model": self.model, "priority_class": str(priority_class), "decision": decision}
        self.decisions.inc(tags=tags)

    def observe(self, queue_by_class: dict[int, int], busy: int, classes: set[int]) -> None:
        if not self.enabled:
            return
        for cls in classes:
            tags = {"model": self.model, "priority_class": str(cls)}
            self.queue_length.set(queue_by_class.get(cls, 0), tags=tags)
        self.inflight.set(busy, tags={"model": self.model})
