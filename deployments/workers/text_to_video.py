"""TextToVideo: a GPU replica that runs one catalog video model, one job at a time.

The worker owns a dispatched job until it ends: it renews the job's lease, writes
real progress from the denoising loop (``callback_on_step_end``, at most a few
times per second), stores the MP4, thumbnail and spritesheet in the artifact
store and completes the job in the state store. Every write is fenced by the
job's ``attempt``: a worker whose job was deleted, or taken back after its lease
ran out, learns so at its next write and stops at the next denoising step.

A video that is made is not thrown away because the file store is briefly down: its
files are written again with backoff for up to ``store_retry_s`` (the lease is renewed
meanwhile), and only then does the job fail (``storage_unavailable``, not charged).
The job completes only once every file is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import ray

from deployments.router.metrics import RouterMetrics
from deployments.workers.runner import (
    PipelineLoader,
    StoppedAtStep,
    load_warm_pipeline,
    stop_pipeline,
)
from deployments.workers.step_engine import SeatCancelled
from deployments.workers.video_failures import video_failure
from deployments.workers.video_steps import SeatReports, VideoSteps, denoising_progress
from mediagate.jobs.video import VideoJobLifecycle
from mediagate.moderation.moderator import Moderator
from mediagate.moderation.settings import ModerationSettings
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.clock import Clock, system_clock
from mediagate.protocol.errors import StoreUnavailable
from mediagate.protocol.work import VideoGeneration, VideoOutcome, VideoTask
from mediagate.provenance.settings import ProvenanceSettings
from mediagate.provenance.signing import ContentSigner, Provenance
from mediagate.stores import JobStore, StateConfig, given_or_opened, open_state_store
from mediagate.stores.artifacts import ArtifactConfig, ArtifactStore, open_artifact_store
from mediagate.stores.records import JobCheckpoint
from models.encoding import encode_mp4, encode_spritesheet, encode_thumbnail, to_uint8_frames
from models.uploads import load_reference_image

logger = logging.getLogger(__name__)
T = TypeVar("T")


class JobCancelled(StoppedAtStep):
    """Raised out of the denoising loop when the job is no longer this worker's."""


def image_to_video_pipeline(spec: ModelSpec, pipeline: Any) -> Any | None:
    """The image-conditioned pipeline of the same family, sharing ``pipeline``'s weights."""
    if spec.video is None or spec.video.image_to_video_pipeline_class is None:
        return None
    import diffusers

    cls = getattr(diffusers, spec.video.image_to_video_pipeline_class, None)
    if cls is None or not hasattr(cls, "from_pipe"):
        raise ValueError(
            f"model {spec.id}: diffusers has no pipeline class "
            f"{spec.video.image_to_video_pipeline_class!r}"
        )
    return cls.from_pipe(pipeline)


class _StepReporter:
    """The denoising loop's callback: progress and lease at most every ``interval_s``.

    Runs in the pipeline's thread and talks to the store through the replica's
    event loop. A write that no longer matches (job deleted or taken back) or a
    cancellation seen by the heartbeat stops the loop at the next step.
    """

    def __init__(
        self,
        worker: TextToVideo,
        task: VideoTask,
        loop: asyncio.AbstractEventLoop,
        cancelled: threading.Event,
    ) -> None:
        self.worker = worker
        self.task = task
        self.loop = loop
        self.cancelled = cancelled
        self.steps_done = 0
        self.resumed_at = 0  # a pipeline call always starts at step 0 (SeatReports: not)
        self._last_report = 0.0

    def __call__(self, pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
        self.steps_done = step + 1
        now = time.monotonic()
        if now - self._last_report >= self.worker.progress_interval_s:
            self._last_report = now
            total = self.task.generation.num_inference_steps
            progress = denoising_progress(self.steps_done, total)
            write = self.worker.renew(self.task, progress=progress)
            try:
                still_ours = asyncio.run_coroutine_threadsafe(write, self.loop).result(timeout=30)
            except Exception as error:  # the store hiccuped: keep going, the lease has slack
                logger.warning("progress write for %s failed: %s", self.task.job_id, error)
            else:
                if not still_ours:
                    self.cancelled.set()
        if self.cancelled.is_set():
            try:
                stop_pipeline(pipeline, step)
            except StoppedAtStep:
                raise JobCancelled(self.task.job_id) from None
        return kwargs


class TextToVideo:
    """Holds one loaded text-to-video pipeline (and its image-to-video sibling)."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        cache_dir: str,
        state: StateConfig | None = None,
        artifacts: ArtifactConfig | None = None,
        load: PipelineLoader | None = None,
        store: JobStore | None = None,
        artifact_store: ArtifactStore | None = None,
        torch_threads: int | None = None,
        progress_interval_s: float = 0.25,
        max_reference_pixels: int = 4096 * 4096,
        store_retry_s: float = 120.0,
        provenance: ProvenanceSettings | None = None,
        moderation: ModerationSettings | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.spec = spec
        self.moderator = Moderator(moderation or ModerationSettings(enabled=False))
        self.refusals = (
            RouterMetrics() if ray.is_initialized() and moderation else None
        )  # a replica
        self.signer = (
            ContentSigner.from_files(provenance) if provenance and provenance.enabled else None
        )
        if self.spec.video is None:
            raise ValueError(f"model {self.spec.id} has no video settings")
        self.video = self.spec.video
        self.store = given_or_opened(store, state, open_state_store, "state")
        self.artifacts = given_or_opened(artifact_store, artifacts, open_artifact_store, "artifact")
        self.progress_interval_s = progress_interval_s
        self.max_reference_pixels = max_reference_pixels
        self.store_retry_s = store_retry_s
        self._clock = clock
        self.jobs = VideoJobLifecycle(self.store, clock=clock)
        self.pipeline = load_warm_pipeline(
            self.spec,
            cache_dir=cache_dir,
            load=load,
            torch_threads=torch_threads,
            warm_up=self._warm_up,
        )
        self.image_pipeline = image_to_video_pipeline(self.spec, self.pipeline)
        self._pipeline_calls = threading.Lock()
        # step-level (catalog `stepping`): text-to-video jobs are seats of a step loop
        self.steps = (
            VideoSteps(spec, self.pipeline, self.artifacts, interval_s=progress_interval_s)
            if spec.stepping is not None
            else None
        )

    def _warm_up(self, pipeline: Any) -> None:
        width, height = self.spec.default_size
        pipeline(
            prompt="warm up",
            width=width,
            height=height,
            num_frames=1 + self.video.frame_multiple,
            num_inference_steps=1,
            output_type="np",
        )

    async def renew(
        self,
        task: VideoTask,
        *,
        progress: int | None = None,
        starting: bool = False,
        checkpoint: JobCheckpoint | None = None,
    ) -> bool:
        """Extend the lease (and record progress, a checkpoint); ``False`` if the job is
        no longer ours."""
        return await self.jobs.renew(
            task.account_id,
            task.job_id,
            task.attempt,
            lease_s=task.lease_s,
            progress=progress,
            starting=starting,
            checkpoint=checkpoint,
        )

    async def _heartbeat(self, task: VideoTask, cancelled: threading.Event) -> None:
        """Renews the lease while the pipeline runs, whatever a single step costs."""
        while not cancelled.is_set():
            await asyncio.sleep(task.lease_s / 3)
            try:
                if not await self.renew(task):
                    cancelled.set()
            except Exception as error:
                logger.warning("lease renewal for %s failed: %s", task.job_id, error)

    def _generate(self, generation: VideoGeneration, reporter: _StepReporter) -> Any:
        with self._pipeline_calls:  # a step-level replica holds seats: one call at a time
            return self._call_pipeline(generation, reporter)

    def _call_pipeline(self, generation: VideoGeneration, reporter: _StepReporter) -> Any:
        import torch

        kwargs = generation.pipeline_kwargs()
        pipeline = self.pipeline
        if generation.input_reference is not None:
            if self.image_pipeline is None:
                raise ValueError(f"model {self.spec.id} takes no input_reference")
            read = functools.partial(self.artifacts.read, generation.input_reference)
            give_up_at = time.monotonic() + self.store_retry_s
            data = self._while_store_recovers(read, give_up_at, reporter.cancelled)
            from PIL import ImageOps

            reference = load_reference_image(
                data, max_bytes=len(data), max_pixels=self.max_reference_pixels
            )
            # Crop to the video's aspect ratio, then scale: no stretched first frame.
            kwargs["image"] = ImageOps.fit(reference, (generation.width, generation.height))
            pipeline = self.image_pipeline
        output = pipeline(
            **kwargs,
            generator=torch.Generator(device="cpu").manual_seed(generation.seed),
            output_type="np",
            callback_on_step_end=reporter,
        )
        return to_uint8_frames(output.frames[0])

    def _encode_and_store(
        self, frames: Any, generation: VideoGeneration, cancelled: threading.Event
    ) -> dict[str, str]:
        """Every file checked (flagged frames: the job fails uncharged), encoded, signed
        (C2PA) and stored, or none (what was stored is deleted again); off the loop."""
        self.moderator.check_frames(frames, generation.moderation)
        files = {
            "video": (encode_mp4(frames, generation.fps), "mp4"),
            "thumbnail": (encode_thumbnail(frames), "webp"),
            "spritesheet": (encode_spritesheet(frames), "jpeg"),
        }
        give_up_at = time.monotonic() + self.store_retry_s  # for all three together
        if self.signer is not None:
            provenance = Provenance(model=self.spec.id, prompt=generation.prompt)
            if generation.input_reference is not None:  # made from the client's image
                read = functools.partial(self.artifacts.read, generation.input_reference)
                parent = self._while_store_recovers(read, give_up_at, cancelled)
                provenance = replace(provenance, action="c2pa.edited", parent=parent)
            files = {
                name: (self.signer.sign(data, extension, provenance), extension)
                for name, (data, extension) in files.items()
            }
        stored: dict[str, str] = {}
        try:
            for name, (data, extension) in files.items():
                put = functools.partial(self.artifacts.put, data, extension, "vid")
                stored[name] = self._while_store_recovers(put, give_up_at, cancelled)
        except BaseException:
            self._discard(stored)
            raise
        return stored

    def _while_store_recovers(
        self, call: Callable[[], T], give_up_at: float, cancelled: threading.Event
    ) -> T:
        """``call`` the artifact store, again with backoff while it is unavailable, until
        ``give_up_at`` (monotonic); stops if the job stops being ours meanwhile."""
        backoff_s = 0.5
        while True:
            try:
                return call()
            except StoreUnavailable:
                if time.monotonic() + backoff_s > give_up_at:
                    raise
                logger.warning("file store unavailable; trying again in %.1fs", backoff_s)
            if cancelled.wait(backoff_s):
                raise JobCancelled("the job stopped being ours while it waited for the store")
            backoff_s = min(2 * backoff_s, 5.0)

    def _discard(self, artifacts: dict[str, str]) -> None:
        for artifact_id in artifacts.values():
            with contextlib.suppress(Exception):
                self.artifacts.delete(artifact_id)

    async def run(self, task: VideoTask) -> VideoOutcome:
        """Generate one dispatched job to its end; returns how it ended."""
        if not await self.renew(task, starting=True):  # deleted or taken back meanwhile
            return VideoOutcome(job_id=task.job_id, status="cancelled")
        loop = asyncio.get_running_loop()
        reporter: _StepReporter | SeatReports
        if self.steps is not None and task.generation.input_reference is None:
            reporter = self.steps.reports_for(task, self.renew)
        else:
            reporter = _StepReporter(self, task, loop, threading.Event())
        cancelled = reporter.cancelled
        heartbeat = asyncio.create_task(self._heartbeat(task, cancelled))
        started = time.perf_counter()
        service_s: float | None = None
        try:
            if isinstance(reporter, SeatReports):
                frames, service_s = await self._denoise_in_seat(reporter)
            else:
                frames = await asyncio.to_thread(self._generate, task.generation, reporter)
            inference_s = time.perf_counter() - started
            if cancelled.is_set():
                raise JobCancelled(task.job_id)
            artifacts = await asyncio.to_thread(
                self._encode_and_store, frames, task.generation, cancelled
            )
        except JobCancelled:
            steps_done = reporter.steps_done - reporter.resumed_at
            logger.info("job %s stopped after %d steps", task.job_id, steps_done)
            return VideoOutcome(job_id=task.job_id, status="cancelled", steps_done=steps_done)
        except Exception as error:
            logger.exception("job %s failed", task.job_id)
            # a job taken back meanwhile keeps its checkpoint for whoever runs it now
            if await self._fail(task, error) and isinstance(reporter, SeatReports):
                await reporter.discard_checkpoints()
            return VideoOutcome(job_id=task.job_id, status="failed")
        finally:
            cancelled.set()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        completed = await self.jobs.complete(
            task.account_id,
            task.job_id,
            task.attempt,
            artifacts=artifacts,
            content_ttl_s=task.content_ttl_s,
        )
        if completed is None:  # deleted (or taken back) while encoding: nobody will fetch these
            await asyncio.to_thread(self._discard, artifacts)
            return VideoOutcome(job_id=task.job_id, status="cancelled")
        if isinstance(reporter, SeatReports):
            await reporter.discard_checkpoints()
        return VideoOutcome(
            job_id=task.job_id,
            status="completed",
            inference_s=inference_s,
            steps_done=reporter.steps_done - reporter.resumed_at,
            resumed_at_step=reporter.resumed_at,
            service_s=service_s,
        )

    def engine_stats(self) -> dict[str, Any]:
        """Step-level: steps run, pause steps, seats held and paused (operators)."""
        return self.steps.engine.stats() if self.steps is not None else {}

    async def _denoise_in_seat(self, reports: SeatReports) -> tuple[Any, float]:
        """The job's frames from a seat of the replica's step loop, and what its steps
        cost; ``JobCancelled`` once it is no longer this dispatch's."""
        assert self.steps is not None
        try:
            outcome = await self.steps.denoise(reports)
        except SeatCancelled:
            raise JobCancelled(reports.task.job_id) from None
        return outcome.images[0], outcome.service_s

    async def _fail(self, task: VideoTask, error: Exception) -> bool:
        """A model-side failure (or a refusal) is final for this job, uncharged; whether
        the job was still this dispatch's to fail."""
        code, message = video_failure(error, self.spec.id, task.generation)
        if code == "moderation_blocked" and self.refusals is not None:  # per tier, as routers
            self.refusals.refused(task.generation.tier or "unknown", code)
        failed = await self.jobs.fail(
            task.account_id,
            task.job_id,
            task.attempt,
            message=message,
            content_ttl_s=task.content_ttl_s,
            code=code,
        )
        return failed is not None
