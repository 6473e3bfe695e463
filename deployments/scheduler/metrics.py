"""Prometheus metrics of a scheduler, through Ray Serve (app, deployment and replica tags
are added).
"""

from __future__ import annotations

from typing import Any

BATCH_BOUNDARIES = [1.5, 2.5, 4.5, 8.5, 16.5, 32.5]  # between whole numbers of images


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

        self.wait_beyond_estimate = metrics.Gauge(
            "mediagate_wait_beyond_estimate_seconds",
            description=(
                "Seconds requests waited beyond their admission estimate (negative: "
                "sooner), p50 and p99 over the last 1000 starts, per class."
            ),
            tag_keys=_tags("model", "priority_class", "quantile"),
        )
        self.batch_images = metrics.Histogram(
            "mediagate_batch_images",
            description="Images in each batch sent to a worker (batched image models).",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("model",),
        )
        self.video_jobs_finished = metrics.Counter(
            "mediagate_video_jobs_finished",
            description="Video jobs that ended, by status (completed or failed).",
            tag_keys=_tags("model", "status"),
        )

    def decided(self, decision: str, priority_class: int) -> None:
        if not self.enabled:
            return
        tags = {"model": self.model, "priority_class": str(priority_class), "decision": decision}
        self.decisions.inc(tags=tags)

    def observe(
        self,
        queue_by_class: dict[int, int],
        busy: int,
        classes: set[int],
        beyond_estimate: dict[int, dict[str, float]],
    ) -> None:
        """The queue per class, the busy slots, and the estimate check's p50 / p99
        (``EstimateCheck.summary``)."""
        if not self.enabled:
            return
        for cls in classes:
            tags = {"model": self.model, "priority_class": str(cls)}
            self.queue_length.set(queue_by_class.get(cls, 0), tags=tags)
        self.inflight.set(busy, tags={"model": self.model})
        for cls, quantiles in beyond_estimate.items():
            for name, quantile in (("p50", "0.5"), ("p99", "0.99")):
                if name in quantiles:
                    tags = {"model": self.model, "priority_class": str(cls), "quantile": quantile}
                    self.wait_beyond_estimate.set(quantiles[name], tags=tags)

    def dispatched(self, images: int) -> None:
        if self.enabled:
            self.batch_images.observe(images, tags={"model": self.model})

    def finished(self, status: str) -> None:
        if self.enabled:
            self.video_jobs_finished.inc(tags={"model": self.model, "status": status})
