"""Admission control: refuse at once, and honestly, what could not start in time.

Pure functions of the queue position, the measured service time and the slots, so the
scheduler's decisions are tested without a clock or a worker. Image and video schedulers
both use them, and both report their queues as ``QueueStats``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Iterable
from typing import Any

from deployments.scheduler.queue import FairQueue, Ticket, tickets_ahead
from mediagate.protocol.errors import Overloaded
from mediagate.protocol.scheduling import PublishedLoad

# Smoothing of the measured service time per batch shape.
SERVICE_TIME_ALPHA = 0.2


# Admit only what the estimate says starts within this fraction of the tier's longest
# wait. The estimate cannot see higher-class work that arrives later nor the reruns
# preemption causes: at 10x overload real waits ran up to 4-6 s (p99) past it with a
# 30 s limit, and with 10% headroom 8% of the admitted free requests still expired
# after waiting their whole limit for nothing (docs/BENCHMARKS.md). The queue still
# holds 80% of the limit, so the workers never run dry.
ADMIT_WITHIN_FRACTION = 0.8


# How many recent starts per class the wait estimate is checked against.
ESTIMATE_CHECKS_KEPT = 1000


def estimate_wait_s(
    *, ahead: int, busy: int, slots: int, service_s: float, share_above: float = 0.0
) -> float:
    """Seconds until a new ticket would start: the work ahead of it spread over the
    slots left after higher classes take their recent share, after the batches
    running now (assumed half done)."""
    # No RUNNING replica counted: a moment of a lightweight update (scale set) or a
    # cold start, not a reason to shed everything; estimate as if one slot ran.
    slots = max(1, slots)
    usable = slots * max(0.1, 1.0 - share_above)
    running_left_s = service_s / 2 if busy >= slots else 0.0
    return running_left_s + math.floor(ahead / usable) * service_s


def admit_or_shed(
    *,
    ahead: int,
    busy: int,
    slots: int,
    service_s: float | None,
    max_wait_s: float,
    queued_in_class: int,
    max_queued: int | None,
    share_above: float = 0.0,
) -> float | None:
    """Raise ``Overloaded`` (503, with an honest Retry-After) when the request would not
    start well within its tier's longest wait (``ADMIT_WITHIN_FRACTION``) or its class's
    queue is full. When it may queue, return the estimated wait (``None`` before any
    service time is measured)."""
    if max_queued is not None and queued_in_class >= max_queued:
        retry_s = max(
            1.0, (service_s or 1.0) * max(1, queued_in_class - max_queued + 1) / max(1, slots)
        )
        raise Overloaded(
            "the queue for your tier is full; please retry shortly", retry_after_s=retry_s
        )
    if service_s is None:
        return None  # nothing measured yet: admit, and learn
    wait_s = estimate_wait_s(
        ahead=ahead, busy=busy, slots=slots, service_s=service_s, share_above=share_above
    )
    admit_within_s = ADMIT_WITHIN_FRACTION * max_wait_s
    if wait_s > admit_within_s:
        raise Overloaded(
            f"the service is busy: your request would wait about {wait_s:.0f}s, too close to "
            f"or beyond your tier's limit of {max_wait_s:g}s; please retry later",
            retry_after_s=max(1.0, wait_s - admit_within_s),
        )
    return wait_s


def shed_on_published_load(
    load: PublishedLoad,
    *,
    priority_class: int,
    batch_key: Hashable,
    account_id: str,
    max_wait_s: float,
    max_queued: int | None,
    age_s: float,
    max_age_s: float,
) -> None:
    """The router's early refusal: the scheduler's own decision (``admit_or_shed``), made
    from the load it last published (see ``Scheduler.published_load``) as this router
    has updated it since (``count_forwarded``). No fresh view, or a class or shape not
    measured yet: return, and the scheduler decides."""
    view = load.classes.get(priority_class)
    service_s = load.service_s.get(batch_key)
    if age_s > max_age_s or view is None or service_s is None:
        return
    admit_or_shed(
        ahead=tickets_ahead(
            queued_above=view.queued_above,
            depths=view.depths,
            own_depth=view.depth_of(account_id),
        ),
        busy=load.busy,
        slots=load.slots,
        service_s=service_s,
        max_wait_s=max_wait_s,
        queued_in_class=view.queued,
        max_queued=max_queued,
        share_above=view.share_above,
    )


def count_forwarded(load: PublishedLoad, *, priority_class: int, account_id: str) -> None:
    """Update a router's copy of the published load for a request it just forwarded, so
    its next decisions see it before the scheduler publishes again: one more ticket in
    the class, and the account one deeper. (Answers since the publication are not
    subtracted: the copy errs towards a longer queue until the next one, which a router
    reads at once when one of its requests is answered.)"""
    view = load.classes.get(priority_class)
    if view is None:
        return
    depth = view.depth_of(account_id)
    depths = view.depths
    if depth and depths.get(depth):
        depths[depth] -= 1
        if not depths[depth]:
            del depths[depth]
    depths[depth + 1] = depths.get(depth + 1, 0) + 1
    view.depth_by_account[account_id] = depth + 1
    view.queued += 1


def updated_service_time(previous: float | None, measured: float) -> float:
    if previous is None:
        return measured
    return (1 - SERVICE_TIME_ALPHA) * previous + SERVICE_TIME_ALPHA * measured


class EstimateCheck:
    """How far actual waits ran past the admission estimates, per class: the honesty of
    the 503s' reasoning and of ``wait_estimate_s``. A request that expired counts with
    the wait it had reached (a lower bound of what it would have waited)."""

    def __init__(self, kept: int = ESTIMATE_CHECKS_KEPT) -> None:
        self._overruns: dict[int, deque[float]] = {}
        self._kept = kept

    def record(self, priority_class: int, *, estimated_s: float | None, waited_s: float) -> None:
        if estimated_s is None:
            return
        overruns = self._overruns.setdefault(priority_class, deque(maxlen=self._kept))
        overruns.append(waited_s - estimated_s)

    def record_first_starts(self, tickets: Iterable[Ticket[Any]], now: float) -> None:
        """Tickets dispatched now: the wait admission estimated against the one they had
        (only at a first start: a run again after a preemption or a lost worker is not)."""
        for ticket in tickets:
            if not (ticket.preemptions or ticket.workers_lost):
                self.record(
                    ticket.job.priority_class,
                    estimated_s=ticket.estimated_wait_s,
                    waited_s=now - ticket.enqueued_at,
                )

    def summary(self) -> dict[int, dict[str, float]]:
        """Per class: seconds waited beyond the estimate at p50 / p99 (negative: sooner)."""
        summary = {}
        for cls, overruns in sorted(self._overruns.items()):
            summary[cls] = p50_p99(overruns)
        return summary


def p50_p99(values: Iterable[float], digits: int = 3) -> dict[str, float]:
    """The median and 99th percentile (nearest rank) of ``values``, rounded."""
    ordered = sorted(values)
    return {
        name: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], digits)
        for name, q in (("p50", 0.5), ("p99", 0.99))
    }


def seat_turn_s(steps_cost_s: float, seats_per_replica: int) -> float:
    """A step-level seat's turn as the wait estimates count a slot's: what its steps
    cost the replica (paused time excluded, a shared step split) times the seats, so
    that slots over service time is the replica's throughput whatever the seats'
    occupancy, and time spent behind higher classes is counted once, in the estimate's
    share above, not again in the seat's own service time."""
    return steps_cost_s * seats_per_replica


def wait_estimates_s_by_class(
    queue: FairQueue[Any], classes: Iterable[int], *, busy: int, slots: int, service_s: float
) -> dict[int, float]:
    """How long a new request of each class, from an account with nothing queued, would
    wait now (``estimate_wait_s`` on the queue as it stands)."""
    return {
        cls: round(
            estimate_wait_s(
                ahead=queue.ahead_of_new(cls),
                busy=busy,
                slots=slots,
                service_s=service_s,
                share_above=queue.share_above(cls),
            ),
            3,
        )
        for cls in sorted(classes)
    }
