"""What an image scheduler reports: queue metrics for autoscaling, wait estimates, the
load routers copy to refuse early, and its queue for ``GET /v1/status`` and operators."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import Any

from autoscaling.policy import report_metrics, retired_metric
from deployments.scheduler.admission import (
    EstimateCheck,
    seat_turn_s,
    wait_estimates_s_by_class,
)
from deployments.scheduler.capacity import WorkerSlots
from deployments.scheduler.in_flight import InFlightBatch
from deployments.scheduler.metrics import SchedulerMetrics
from deployments.scheduler.queue import FairQueue
from deployments.scheduler.settings import ImageSchedulerSettings
from deployments.scheduler.step_reports import StepLevelReport
from deployments.scheduler.turned_away import TurnedAwayDemand
from mediagate.protocol.catalog import Batching, ModelSpec
from mediagate.protocol.clock import Clock
from mediagate.protocol.scheduling import Decision, PublishedLoad, QueueStats, decision_key
from mediagate.protocol.work import ImageJob, ImageResult


class ImageSchedulerReports:
    """The reporting half of ``Scheduler`` (deployments/scheduler/images.py), which
    owns every attribute read here."""

    spec: ModelSpec
    settings: ImageSchedulerSettings
    counts: Counter[str]
    estimate_check: EstimateCheck
    _queue: FairQueue[ImageJob]
    _slots: WorkerSlots
    _service_s: dict[Hashable, float]
    _classes_seen: set[int]
    _in_flight: dict[int, InFlightBatch]
    _metrics: SchedulerMetrics
    _step_level: StepLevelReport
    _turned_away: TurnedAwayDemand
    _batching: Batching
    _clock: Clock

    @property
    def capacity(self) -> int:
        return self._slots.capacity

    def _count(self, decision: Decision, priority_class: int) -> None:
        self.counts[decision_key(decision, priority_class)] += 1
        self._classes_seen.add(priority_class)
        self._metrics.decided(decision, priority_class)

    def _count_shed(self, job: ImageJob) -> None:
        """A request shed at admission: counted, and the slot time it would have taken
        kept as demand turned away (none before its shape's service time is measured)."""
        self._count("shed", job.priority_class)
        slot_s = self._service_s.get(job.batch_key, 0.0)
        self._turned_away.add(job.account_id, job.priority_class, slot_s, self._clock())

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Queue metrics that the autoscaling policy reads (``ctx.aggregated_metrics``)."""
        by_class = self._queue.length_by_class()
        self._metrics.observe(
            by_class,
            self._slots.busy,
            self._classes_seen | set(by_class),
            self.estimate_check.summary(),
        )
        running_by_class: Counter[int] = Counter()
        for batch in self._in_flight.values():
            running_by_class[batch.priority_class] += len(batch.tickets)
        stats = report_metrics(
            by_class,
            running_by_class.total(),
            self.settings.weights(),
            self._classes_seen,
            running_by_class,
            self._turned_away.concurrency_by_class(self._clock()),
        )
        return stats | {"inflight": float(self._slots.busy)} | retired_metric(self.settings.retired)

    def measured_service_s(self, in_flight: InFlightBatch, results: list[ImageResult]) -> float:
        """How long a finished batch held its slot, as the wait estimates count a slot's
        turn: the call's duration; or, from a step-level worker, ``seat_turn_s``."""
        costs = [result.service_s for result in results]
        if any(cost is None for cost in costs):
            return self._clock() - in_flight.started_at
        steps_cost_s = sum(c for c in costs if c is not None)
        return seat_turn_s(steps_cost_s, self.settings.slots_per_replica)

    def wait_estimates_s(self) -> dict[int, float]:
        """How long a new request of each class would wait now (None measured yet: 0)."""
        service_s = sum(self._service_s.values()) / len(self._service_s) if self._service_s else 0.0
        return wait_estimates_s_by_class(
            self._queue,
            self._classes_seen | set(self._queue.length_by_class()),
            busy=self._slots.busy,
            slots=self.capacity,
            service_s=service_s,
        )

    def published_load(self, turned_away: dict[int, float] | None = None) -> PublishedLoad:
        """What routers need to make this scheduler's admission decision themselves,
        without a hop: slots, measured service times, and per class the queue, the work
        above it, the share of capacity above it and its accounts' queue depths. A
        router reads it with the slot-seconds it refused early since its last read
        (``turned_away``, per class), which the autoscaler's report then counts."""
        if turned_away:
            self._turned_away.merge(turned_away, self._clock())
        return PublishedLoad(
            busy=self._slots.busy,
            slots=self.capacity,
            service_s=dict(self._service_s),
            classes=self._queue.class_loads(self._classes_seen),
        )

    def queue_stats(self) -> QueueStats:
        """The queue as every scheduler reports it (what ``GET /v1/status`` shows)."""
        return QueueStats(
            queue_len=len(self._queue),
            queue_by_class=self._queue.length_by_class(),
            running_by_class=dict(Counter(b.priority_class for b in self._in_flight.values())),
            busy_slots=self._slots.busy,
            capacity=self.capacity,
            replicas=self._slots.replicas,
            wait_estimate_s_by_class=self.wait_estimates_s(),
            wait_beyond_estimate_s_by_class=self.estimate_check.summary(),
            decision_counts=dict(self.counts),
            step_level=self._step_level.summary(),
            first_step_wait_s_by_class=self._step_level.first_step_waits_s(),
        )

    def stats(self) -> dict[str, Any]:
        """For operators and tests: ``queue_stats`` plus batching and service times."""
        return {
            "model": self.spec.id,
            **self.queue_stats().as_dict(),
            "max_batch_size": self._batching.max_batch_size,
            "service_s": {str(key): round(value, 4) for key, value in self._service_s.items()},
        }
