"""StepLevelTextToImage: an image worker replica that runs the denoising loop itself,
step by step, for every request it holds (issue 17).

Same contract as ``TextToImage`` (``ImageWorking``): the scheduler sends jobs and gets
``ImageResult``s. But each job takes a seat in the replica's ``StepEngine`` and joins
the running batch at the next step boundary, so ``max_ongoing_requests`` is the
replica's seats (``stepping.seats_per_replica``), not 1, and the scheduler sends one
job per call. A higher-class job pauses lower-class ones at a step (they keep their
latents and resume), so the scheduler does not preempt. A cancelled call (a caller
gone) leaves at the next step. Streamed jobs get their images but no previews yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from deployments.workers.runner import PipelineLoader, load_warm_pipeline
from deployments.workers.step_engine import StepEngine, Stepper
from deployments.workers.step_metrics import StepMetrics
from deployments.workers.text_to_image import replica_id, warm_up_job
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import GenerationFailed, InvalidRequest
from mediagate.protocol.work import ImageJob, ImageResult, PartialImage
from models.loading import load_pipeline
from models.simulated import SimulatedPipeline

logger = logging.getLogger(__name__)


def stepper_for(pipeline: Any) -> Stepper:
    """The stepper of a loaded pipeline's family; a ``ValueError`` for one without."""
    if isinstance(pipeline, SimulatedPipeline):
        from models.stepping.simulated import SimulatedStepper

        return SimulatedStepper(pipeline.step_ms, batch_cost=pipeline.batch_cost)
    if type(pipeline).__name__ == "StableDiffusionPipeline":
        from models.stepping.stable_diffusion import StableDiffusionStepper

        return StableDiffusionStepper(pipeline)
    raise ValueError(
        f"{type(pipeline).__name__} has no step-level loop yet; unset the model's `stepping`"
    )


class StepLevelTextToImage:
    """Holds one loaded pipeline and its step engine; each job is a seat."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        cache_dir: str,
        load: PipelineLoader = load_pipeline,
        torch_threads: int | None = None,
    ) -> None:
        if spec.stepping is None:
            raise ValueError(f"model {spec.id} is not served step by step")
        self.spec = spec
        pipeline = load_warm_pipeline(
            spec,
            cache_dir=cache_dir,
            load=load,
            torch_threads=torch_threads,
            warm_up=lambda _: None,
        )
        self.engine = StepEngine(
            stepper_for(pipeline),
            max_batch_images=spec.batching.max_batch_size,
            max_pauses=spec.stepping.max_pauses,
        )
        self.replica_id = replica_id()
        self.engine.submit(warm_up_job(spec)).result(timeout=600)
        self.metrics = StepMetrics(spec.id)

    async def generate(self, jobs: list[ImageJob]) -> list[ImageResult]:
        """Each job a seat; the results when all are done. Cancelling the call takes
        its seats out at the next step."""
        if any(job.task != "text-to-image" for job in jobs):
            raise InvalidRequest(f"model {self.spec.id} serves text-to-image step by step only")
        started = time.perf_counter()
        seats = [asyncio.wrap_future(self.engine.submit(job)) for job in jobs]
        try:
            made = await asyncio.gather(*seats)
        except asyncio.CancelledError:
            for job in jobs:
                self.engine.cancel(job.request_key)
            raise
        except Exception as error:
            logger.exception("generation failed for %s", [job.request_id for job in jobs])
            raise GenerationFailed(
                f"model {self.spec.id} failed to generate; please retry"
            ) from error
        took_s = time.perf_counter() - started
        engine = self.engine.snapshot()
        waits = [
            (job.priority_class, seat.first_step_wait_s)
            for job, seat in zip(jobs, made, strict=True)
        ]
        self.metrics.observe(engine, dict(self.engine.counts), waits)
        return [
            ImageResult(
                request_id=job.request_id,
                images=seat.images,
                batch_images=len(seat.images),
                inference_s=took_s,
                worker=self.replica_id,
                timings_ms={"pipeline": took_s * 1000},
                first_step_wait_s=seat.first_step_wait_s,
                service_s=seat.service_s,
                engine=engine,
            )
            for job, seat in zip(jobs, made, strict=True)
        ]

    async def generate_streaming(
        self, jobs: list[ImageJob]
    ) -> AsyncIterator[PartialImage | list[ImageResult]]:
        """``generate``'s results as a stream (no previews from the step loop yet)."""
        yield await self.generate(jobs)

    def engine_stats(self) -> dict[str, Any]:
        """Steps run, images stepped, pause steps, seats held and paused (operators)."""
        return self.engine.stats()
