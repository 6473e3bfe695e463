"""Preemption: when higher-priority work waits and every slot is busy, take a slot back.

A pure decision over what runs on each slot, so it is tested with a fake clock.
Taking a batch back wastes the steps it has done, so the policy only preempts a
batch of a lower class that still has a good part of its work ahead, and never
preempts the same request more than ``max_per_request`` times (it then runs to
the end, so a busy hour cannot starve it forever).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class PreemptionPolicy(BaseModel):
    """When a running batch may be taken back (an image scheduler's ``user_config``
    ``preemption`` key, e.g. ``{"enabled": false}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="Take slots back for higher classes at all.")
    min_remaining_fraction: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Preempt only a batch with at least this share of its expected time "
        "still ahead: waiting out a nearly finished batch costs less than redoing it.",
    )
    max_per_request: int = Field(
        1, ge=0, description="Times one request may be preempted; then it runs to the end."
    )


@dataclass(frozen=True)
class RunningBatch:
    """What one busy slot runs, as the preemption decision sees it."""

    batch_id: int
    priority_class: int
    started_at: float
    expected_s: float | None  # the measured service time of its shape; None: unknown
    preemptions: int  # the most times any of its requests was preempted already
    stopping: bool = False  # already being taken back


def remaining_fraction(batch: RunningBatch, now: float) -> float:
    if not batch.expected_s:
        return 0.0  # unknown length: never worth gambling on
    return max(0.0, 1.0 - (now - batch.started_at) / batch.expected_s)


def batch_to_preempt(
    running: Iterable[RunningBatch],
    waiting_class: int,
    *,
    now: float,
    policy: PreemptionPolicy,
) -> RunningBatch | None:
    """The batch to take back for a request of ``waiting_class``, or None: the lowest
    class first, and within it the one with the most work left (the least wasted)."""
    if not policy.enabled:
        return None
    candidates = [
        batch
        for batch in running
        if not batch.stopping
        and batch.priority_class < waiting_class
        and batch.preemptions < policy.max_per_request
        and remaining_fraction(batch, now) >= policy.min_remaining_fraction
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda b: (b.priority_class, -remaining_fraction(b, now)))


def class_to_preempt_for(queued_by_class: Mapping[int, int], *, stopping: int) -> int | None:
    """The waiting class to take a slot back for when every slot is busy: the highest
    one, while fewer batches are being stopped than it has requests waiting (at most one
    batch taken back per waiting request)."""
    waiting = [cls for cls, queued in queued_by_class.items() if queued]
    if not waiting:
        return None
    top = max(waiting)
    return top if stopping < queued_by_class[top] else None
