"""What schedulers report about their queues, as types: ``QueueStats`` (one shape for
image and video models: ``stats()``, ``GET /v1/status``) and ``PublishedLoad`` (what an
image scheduler publishes so routers can make its admission decision without a hop).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

Decision = Literal["admitted", "shed", "expired", "preempted"]


DECISIONS: tuple[Decision, ...] = get_args(Decision)


def _decision_prefix(decision: Decision) -> str:
    return f"{decision}_class_"


def decision_key(decision: Decision, priority_class: int) -> str:
    """The ``stats()`` key counting ``decision`` for ``priority_class``: ``shed_class_0``."""
    return f"{_decision_prefix(decision)}{priority_class}"


@dataclass(frozen=True)
class QueueStats:
    """What every scheduler, image or video, reports about its queue in ``stats()``: the
    one schema ``GET /v1/status`` reads. Counts per priority class only, never job or
    account ids. On the wire (``as_dict``) the decisions are flat ``shed_class_0`` keys."""

    queue_len: int = 0
    queue_by_class: dict[int, int] = field(default_factory=dict)
    running_by_class: dict[int, int] = field(default_factory=dict)
    busy_slots: int = 0
    capacity: int = 0
    replicas: int = 0
    wait_estimate_s_by_class: dict[int, float] = field(default_factory=dict)
    wait_beyond_estimate_s_by_class: dict[int, dict[str, float]] = field(default_factory=dict)
    decision_counts: dict[str, int] = field(default_factory=dict)  # decision_key -> count
    # step-level models only (issue 17): their workers' step loops, and per class the
    # p50/p99 wait from arrival at a worker to the first denoising step
    step_level: dict[str, float] = field(default_factory=dict)
    first_step_wait_s_by_class: dict[int, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return values | values.pop("decision_counts")

    @classmethod
    def from_dict(cls, stats: Mapping[str, Any]) -> QueueStats:
        """Read a scheduler's ``stats()``, ignoring its own extra keys; a key it lacks
        (an older scheduler) reads as empty."""
        names = {name for name in cls.__dataclass_fields__ if name != "decision_counts"}
        prefixes = tuple(_decision_prefix(decision) for decision in DECISIONS)
        return cls(
            **{name: stats[name] for name in names if name in stats},
            decision_counts={k: v for k, v in stats.items() if k.startswith(prefixes)},
        )

    def by_class(self, decision: Decision) -> dict[int, int]:
        """How many requests of each class met ``decision``."""
        prefix = _decision_prefix(decision)
        return {
            int(key.removeprefix(prefix)): count
            for key, count in self.decision_counts.items()
            if key.startswith(prefix)
        }


@dataclass
class ClassLoad:
    """One priority class in a published load. It names the accounts with work queued
    (internal ids, never shown to clients): a router must know exactly how deep the
    account it is deciding for already is. Estimating that from its own count of
    unanswered requests miscounted whatever was running or on its way back, and
    ``count_forwarded`` then added a phantom account to ``depths``."""

    queued: int  # tickets of this class waiting
    queued_above: int  # tickets of higher classes waiting (served first)
    share_above: float  # share of recent dispatches that went to higher classes
    depths: dict[int, int]  # how many of its accounts have 1, 2, ... tickets queued
    depth_by_account: dict[str, int] = field(default_factory=dict)  # the same, by account

    def depth_of(self, account_id: str) -> int:
        return self.depth_by_account.get(account_id, 0)


@dataclass
class PublishedLoad:
    """An image scheduler's load as routers see it (refreshed every few tenths of a
    second; a router updates its copy for each request it forwards)."""

    busy: int  # worker slots running a batch
    slots: int  # worker slots in all
    service_s: dict[Hashable, float]  # measured seconds per batch shape
    classes: dict[int, ClassLoad] = field(default_factory=dict)
