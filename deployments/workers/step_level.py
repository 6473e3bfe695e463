"""StepLevelTextToImage: an image worker replica that runs the denoising loop itself,
step by step, for every request it holds (issue 17).

Same contract as ``TextToImage`` (``ImageWorking``): the scheduler sends jobs and gets
``ImageResult``s. But each job takes a seat in the replica's ``StepEngine`` and joins
the running batch at the next step boundary, so ``max_ongoing_requests`` is the
replica's seats (``stepping.seats_per_replica``), not 1, and the scheduler sends one
job per call. A higher-class job pauses lower-class ones at a step (they keep their
latents and resume), so the scheduler does not preempt. A cancelled call (a caller
gone) leaves at the next step. Streamed jobs get previews after the same steps as on
the whole-pipeline worker (``preview_steps``), the VAE decode of their latents there,
made on the engine's decoder thread (never on the step loop).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from deployments.streams import items_until
from deployments.workers.runner import PipelineLoader, load_warm_pipeline
from deployments.workers.step_engine import Seat, SeatOutcome, StepEngine, Stepper
from deployments.workers.step_metrics import StepMetrics
from deployments.workers.text_to_image import replica_id, warm_up_job
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import GenerationFailed, InvalidRequest, MediagateError
from mediagate.protocol.work import ImageJob, ImageResult, PartialImage, preview_steps
from models.encoding import to_raw_image
from models.previews import can_preview, decode_previews
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
    if type(pipeline).__name__ == "StableDiffusionXLPipeline":
        from models.stepping.stable_diffusion import StableDiffusionXLStepper

        return StableDiffusionXLStepper(pipeline)
    raise ValueError(
        f"{type(pipeline).__name__} has no step-level loop yet; unset the model's `stepping`"
    )


@dataclass
class PreviewSink:
    """Where a streamed job's previews go: after which of its steps (0-based), and the
    thread-safe hand-over to its caller's stream."""

    job_index: int
    job: ImageJob
    steps: list[int]
    deliver: Callable[[PartialImage], None]
    failed: bool = False  # a preview decode failed: the rest go without


class StepLevelTextToImage:
    """Holds one loaded pipeline and its step engine; each job is a seat."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        cache_dir: str,
        load: PipelineLoader | None = None,
        torch_threads: int | None = None,
    ) -> None:
        if spec.stepping is None:
            raise ValueError(f"model {spec.id} is not served step by step")
        self.spec = spec
        self._previews: dict[str, PreviewSink] = {}  # by request key, streamed jobs only
        pipeline = self.pipeline = load_warm_pipeline(
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
            max_idle_device_bytes=spec.stepping.max_idle_device_bytes,
            on_step=self._stepped,
        )
        self.replica_id = replica_id()
        self.engine.submit(warm_up_job(spec)).result(timeout=600)
        self.metrics = StepMetrics(spec.id)

    def _take_out(self, jobs: list[ImageJob]) -> None:
        for job in jobs:
            self.engine.cancel(job.request_key)

    async def generate(self, jobs: list[ImageJob]) -> list[ImageResult]:
        """Each job a seat; the results when all are done. Cancelling the call takes
        its seats out at the next step."""
        if any(job.task != "text-to-image" for job in jobs):
            raise InvalidRequest(f"model {self.spec.id} serves text-to-image step by step only")
        if not jobs:
            return []
        started = time.perf_counter()
        seats: list[asyncio.Future[SeatOutcome]] = []
        try:
            for job in jobs:
                seat = asyncio.wrap_future(self.engine.submit(job))
                # read here, whatever ends the call first
                seat.add_done_callback(lambda done: done.cancelled() or done.exception())
                seats.append(seat)
        except BaseException:  # a seat refused: the ones already given leave again
            self._take_out(jobs[: len(seats)])
            raise
        try:
            await asyncio.wait(seats, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            self._take_out(jobs)
            raise
        failures = [e for seat in seats if seat.done() and (e := seat.exception()) is not None]
        if failures:  # the call answers as one: its other seats leave at the next step
            self._take_out(jobs)
            refusals = [f for f in failures if isinstance(f, MediagateError)]
            if len(refusals) == len(failures):  # shed after its tier's wait: a 503, not a 500
                raise refusals[0]
            logger.error(
                "generation failed for %s", [job.request_id for job in jobs], exc_info=failures[0]
            )
            raise GenerationFailed(
                f"model {self.spec.id} failed to generate; please retry"
            ) from failures[0]
        made = [seat.result() for seat in seats]
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
                model_version=self.spec.version,
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
        """The jobs' previews as they are made, then ``generate``'s results."""
        loop = asyncio.get_running_loop()
        partials: asyncio.Queue[PartialImage] = asyncio.Queue()

        def deliver(partial: PartialImage) -> None:  # from the decoder's thread
            loop.call_soon_threadsafe(partials.put_nowait, partial)

        for index, job in enumerate(jobs):
            steps = preview_steps(job.num_inference_steps, job.partial_images)
            if steps:
                self._previews[job.request_key] = PreviewSink(index, job, steps, deliver)
        made = asyncio.ensure_future(self.generate(jobs))
        try:
            async for partial in items_until(made, partials):
                yield partial
            yield made.result()
        finally:
            for job in jobs:
                self._previews.pop(job.request_key, None)
            if not made.done():  # the caller left: its seats leave at the next step
                made.cancel()

    def _stepped(self, batch: list[Seat]) -> None:
        """After a step (the engine's thread): previews due for streamed seats in it are
        decoded aside, from a copy of their latents (the next step replaces them)."""
        for seat in batch:
            sink = self._previews.get(seat.job.request_key)
            done_step = seat.state.step_index - 1 if sink else -1
            if sink is None or sink.failed or done_step not in sink.steps:
                continue
            latents = getattr(seat.state, "latents", None)
            if latents is None or not can_preview(self.pipeline, latents):
                continue  # the simulated model, or a layout previews do not know
            preview = sink.steps.index(done_step)
            self.engine.run_aside(
                functools.partial(self._decode_preview, sink, latents.clone(), preview)
            )

    def _decode_preview(self, sink: PreviewSink, latents: Any, preview: int) -> None:
        job = sink.job
        try:
            images = decode_previews(self.pipeline, latents, width=job.width, height=job.height)
        except Exception:  # a preview is a courtesy: the job goes on without them
            logger.exception("previews of %s failed; no more for it", job.request_id)
            sink.failed = True
            return
        for image_index, image in enumerate(images):
            sink.deliver(
                PartialImage(
                    job_index=sink.job_index,
                    image_index=image_index,
                    partial_image_index=preview,
                    image=to_raw_image(image),
                )
            )

    def engine_stats(self) -> dict[str, Any]:
        """Steps run, images stepped, pause steps, seats held and paused (operators)."""
        return self.engine.stats()
