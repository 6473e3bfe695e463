"""What a video scheduler reports: queue metrics for autoscaling, and its queue for
``GET /v1/status`` and operators."""

from __future__ import annotations

from collections import Counter
from typing import Any

from autoscaling.policy import report_metrics, retired_metric
from deployments.scheduler.admission import EstimateCheck, wait_estimates_s_by_class
from deployments.scheduler.capacity import WorkerSlots
from deployments.scheduler.metrics import SchedulerMetrics
from deployments.scheduler.settings import VideoSchedulerSettings
from deployments.scheduler.turned_away import TurnedAwayDemand
from deployments.scheduler.video_queue import VideoQueue
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.clock import Clock
from mediagate.protocol.scheduling import Decision, QueueStats, decision_key


class VideoSchedulerReports:
    """The reporting half of ``VideoScheduler`` (deployments/scheduler/videos.py), which
    owns every attribute read here."""

    spec: ModelSpec
    settings: VideoSchedulerSettings
    estimate_check: EstimateCheck
    decisions: Counter[str]
    counts: dict[str, int]
    _queue: VideoQueue
    _slots: WorkerSlots
    _metrics: SchedulerMetrics
    _classes_seen: set[int]
    _service_s: float | None
    _running: dict[str, Any]
    _running_class: dict[str, int]
    _adopted: dict[str, int]
    _turned_away: TurnedAwayDemand
    _clock: Clock

    def _count(self, decision: Decision, priority_class: int) -> None:
        self.decisions[decision_key(decision, priority_class)] += 1
        self._classes_seen.add(priority_class)
        self._metrics.decided(decision, priority_class)

    def _count_shed(self, account_id: str, priority_class: int) -> None:
        """A job shed at admission: counted, and the slot time it would have taken kept
        as demand turned away (none before a job's time is measured)."""
        self._count("shed", priority_class)
        self._turned_away.add(account_id, priority_class, self._service_s or 0.0, self._clock())

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Queue metrics that the autoscaling policy reads (one job per slot)."""
        by_class = self._queue.length_by_class()
        self._classes_seen |= set(by_class)
        self._metrics.observe(
            by_class, self._slots.busy, self._classes_seen, self.estimate_check.summary()
        )
        stats = report_metrics(
            by_class,
            self._slots.busy,
            self.settings.weights(),
            self._classes_seen,
            Counter([*self._running_class.values(), *self._adopted.values()]),
            self._turned_away.concurrency_by_class(self._clock()),
        )
        return stats | {"inflight": float(self._slots.busy)} | retired_metric(self.settings.retired)

    def queue_stats(self) -> QueueStats:
        """The queue as every scheduler reports it (what ``GET /v1/status`` shows)."""
        classes = self._classes_seen | set(self._queue.length_by_class())
        return QueueStats(
            queue_len=len(self._queue),
            queue_by_class=self._queue.length_by_class(),
            running_by_class=dict(
                Counter([*self._running_class.values(), *self._adopted.values()])
            ),
            busy_slots=self._slots.busy,
            capacity=self._slots.capacity,
            replicas=self._slots.replicas,
            wait_estimate_s_by_class=wait_estimates_s_by_class(
                self._queue,
                classes,
                busy=self._slots.busy,
                slots=self._slots.for_estimates,
                service_s=self._service_s or 0.0,
            ),
            wait_beyond_estimate_s_by_class=self.estimate_check.summary(),
            decision_counts=dict(self.decisions),
        )

    def stats(self) -> dict[str, Any]:
        """For operators and tests: ``queue_stats`` plus job counters and the running ids."""
        return {
            "model": self.spec.id,
            **self.queue_stats().as_dict(),
            "running": sorted([*self._running, *self._adopted]),
            **self.counts,
        }
