"""Prometheus metrics of a step-level worker (issue 17), through Ray Serve (app,
deployment and replica tags are added): steps run and images stepped (their rates'
ratio is the batch occupancy per step), requests paused and the memory they hold, and
the wait from a request's arrival to its first step, per priority class.
"""

from __future__ import annotations

from typing import Any

from mediagate.protocol.work import StepEngineStats

# seconds; a step is tens of milliseconds on a GPU, a wait beyond the tier's limit is shed
FIRST_STEP_WAIT_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class StepMetrics:
    """Records nothing outside Ray (unit tests build engines by hand)."""

    def __init__(self, model: str) -> None:
        import ray
        from ray.serve import metrics

        self.model = model
        self.enabled = ray.is_initialized()
        self._steps_seen = 0
        self._images_seen = 0
        tags: Any = ("model",)  # Ray annotates tag_keys as a one-element tuple
        class_tags: Any = ("model", "priority_class")
        self.steps = metrics.Counter(
            "mediagate_denoising_steps",
            description="Denoising steps run (one forward pass of a batch each).",
            tag_keys=tags,
        )
        self.images_stepped = metrics.Counter(
            "mediagate_denoising_images_stepped",
            description="Images advanced by a step; over steps: the batch occupancy.",
            tag_keys=tags,
        )
        self.paused = metrics.Gauge(
            "mediagate_paused_requests",
            description="Started requests that sat out the last step (kept, to resume).",
            tag_keys=tags,
        )
        self.paused_bytes = metrics.Gauge(
            "mediagate_paused_bytes",
            description="Memory held by paused requests' latents and embeddings.",
            tag_keys=tags,
        )
        self.first_step_wait = metrics.Histogram(
            "mediagate_first_step_wait_seconds",
            description="From a request's arrival at the worker to its first step.",
            boundaries=FIRST_STEP_WAIT_BOUNDARIES,
            tag_keys=class_tags,
        )

    def observe(
        self, stats: StepEngineStats, totals: dict[str, int], waits: list[tuple[int, float]]
    ) -> None:
        """Record a snapshot, the engine's running totals and the first-step waits of
        the requests that just finished."""
        if not self.enabled:
            return
        tags = {"model": self.model}
        steps, images = totals.get("steps", 0), totals.get("images_stepped", 0)
        if steps > self._steps_seen:
            self.steps.inc(steps - self._steps_seen, tags=tags)
        if images > self._images_seen:
            self.images_stepped.inc(images - self._images_seen, tags=tags)
        self._steps_seen, self._images_seen = steps, images
        self.paused.set(stats.paused, tags=tags)
        self.paused_bytes.set(stats.paused_bytes, tags=tags)
        for priority_class, wait_s in waits:
            self.first_step_wait.observe(
                wait_s, tags={"model": self.model, "priority_class": str(priority_class)}
            )
