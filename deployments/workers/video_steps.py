"""A video worker's step loop (issue 17): its jobs are seats of a ``StepEngine``, so a
higher-class job pauses a lower one at a step (the paused one keeps its latents and
scheduler state, and resumes where it stopped: the same video as if never paused), and
a running job's state is written to the artifact store every few steps, so that when
its worker is lost the next dispatch resumes from there instead of from step 0.

``TextToVideo`` (text_to_video.py) builds these when its catalog entry has
``stepping`` and its pipeline has a loop here (Wan, one transformer); image-to-video
jobs still run as one pipeline call.

What runs on the engine's thread never waits on a store: progress, lease and
checkpoint writes are handed to the replica's event loop, one job's in order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deployments.workers.step_engine import SeatOutcome, StepEngine
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import NotFound, StoreUnavailable
from mediagate.protocol.work import VideoTask
from mediagate.stores.artifacts import ArtifactStore
from mediagate.stores.records import JobCheckpoint
from models.encoding import to_uint8_frames
from models.stepping.checkpoints import checkpoint_bytes, resume

logger = logging.getLogger(__name__)
CHECKPOINT_ID = re.compile(r"^ckp_[0-9a-f]{32}\.pt$")  # what the artifact store names them

# Share of the progress bar given to denoising; decoding and encoding take the rest.
DENOISING_SHARE = 0.95


def denoising_progress(steps_done: int, steps: int) -> int:
    return int(100 * DENOISING_SHARE * steps_done / steps)


@dataclass(frozen=True)
class VideoSeatJob:
    """A dispatched video job as the engine sees it: one sample a step, no wait limit
    in the worker (the scheduler holds its queue), and the checkpoint it resumes from
    (read before it takes its seat: the step loop never waits on a store)."""

    task: VideoTask
    checkpoint: bytes | None = None
    images: int = 1
    max_wait_s: float = math.inf

    @property
    def request_id(self) -> str:
        return self.task.job_id

    @property
    def request_key(self) -> str:
        return f"{self.task.job_id}:{self.task.attempt}"

    @property
    def priority_class(self) -> int:
        return self.task.priority_class


def read_checkpoint(artifacts: ArtifactStore, task: VideoTask) -> bytes | None:
    """The bytes of the checkpoint ``task`` resumes from; None (the job starts over, as
    logged) when it has none, it is gone or unreadable, or its id is not a checkpoint's."""
    if task.checkpoint is None:
        return None
    if not CHECKPOINT_ID.match(task.checkpoint):
        logger.warning("job %s starts over: %r is no checkpoint", task.job_id, task.checkpoint)
        return None
    try:
        return artifacts.read(task.checkpoint)
    except (NotFound, StoreUnavailable) as error:
        logger.warning("job %s starts over: its checkpoint is unreadable: %s", task.job_id, error)
        return None


class ResumingWanSteps:
    """The engine's stepper for video seats: ``WanStepper``, each job started from its
    checkpoint when it has one (one that does not fit: from step 0, logged)."""

    def __init__(self, stepper: Any) -> None:
        self.stepper = stepper

    def start(self, job: VideoSeatJob) -> Any:
        state = self.stepper.start(job.task.generation)
        if job.checkpoint is None:
            return state
        try:
            state = resume(state, job.checkpoint)
        except ValueError as error:
            logger.warning("job %s starts over: its checkpoint %s", job.request_id, error)
        else:
            logger.info("job %s resumes at step %d", job.request_id, state.step_index)
        return state

    def step(self, states: Any) -> None:
        self.stepper.step(states)

    def finish(self, state: Any) -> list[Any]:
        return [self.stepper.finish(state)]

    def held_bytes(self, state: Any) -> int:
        return int(self.stepper.held_bytes(state))

    def offload(self, state: Any) -> None:
        self.stepper.offload(state)

    def reload(self, state: Any) -> None:
        self.stepper.reload(state)


Renew = Callable[..., Any]  # TextToVideo.renew: (task, progress=, checkpoint=) -> bool


class SeatReports:
    """One running video seat's writes: progress (at most every ``interval_s``), the
    lease, and a checkpoint every ``every_steps`` steps; a write that finds the job is
    no longer this dispatch's sets ``cancelled`` and the seat leaves at the next step."""

    def __init__(
        self,
        task: VideoTask,
        *,
        renew: Renew,
        artifacts: ArtifactStore,
        loop: asyncio.AbstractEventLoop,
        interval_s: float,
        every_steps: int,
    ) -> None:
        self.task = task
        self.renew = renew
        self.artifacts = artifacts
        self.loop = loop
        self.interval_s = interval_s
        self.every_steps = every_steps
        self.cancelled = threading.Event()
        self.steps_done = 0
        self.resumed_at = 0
        self._last_report = 0.0
        self._checkpoints = [task.checkpoint] if task.checkpoint else []  # oldest first
        self._writes = asyncio.Lock()
        self._checkpoint_in_flight = False  # a store slower than the steps: skip, not pile up

    @property
    def steps(self) -> int:
        return self.task.generation.num_inference_steps

    def stepped(self, state: Any) -> None:
        """After a step the job ran in (the engine's thread)."""
        if not self.steps_done:
            self.resumed_at = state.step_index - 1
        self.steps_done = state.step_index
        progress = denoising_progress(self.steps_done, self.steps)
        due = not state.done and self.steps_done % self.every_steps == 0
        if due and not self._checkpoint_in_flight:
            self._checkpoint_in_flight = True
            data = checkpoint_bytes(state)  # now: the next step changes the state
            self._send(self._checkpoint(data, self.steps_done, progress))
        elif time.monotonic() - self._last_report >= self.interval_s:
            self._last_report = time.monotonic()
            self._send(self._progress(progress))

    def _send(self, write: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(write, self.loop)

        def settled(done: Any) -> None:
            error = done.exception()
            if error is not None:  # the store hiccuped: keep going, the lease has slack
                logger.warning("a write for %s failed: %r", self.task.job_id, error)
            elif done.result() is False:
                self.cancelled.set()

        future.add_done_callback(settled)

    async def _progress(self, progress: int) -> bool:
        async with self._writes:
            return bool(await self.renew(self.task, progress=progress))

    async def _checkpoint(self, data: bytes, step: int, progress: int) -> bool:
        """Store the checkpoint, then point the job at it; the one it replaces goes. Not
        recorded (the job is no longer ours, or the store failed): it goes, and the
        job's own stays for whoever runs it next."""
        try:
            async with self._writes:
                return await self._write_checkpoint(data, step, progress)
        finally:
            self._checkpoint_in_flight = False

    async def _write_checkpoint(self, data: bytes, step: int, progress: int) -> bool:
        artifact = await asyncio.to_thread(self.artifacts.put, data, "pt", "ckp")
        checkpoint = JobCheckpoint(artifact=artifact, step=step, progress=progress)
        try:
            ours = bool(await self.renew(self.task, progress=progress, checkpoint=checkpoint))
        except BaseException:
            # the write may have landed all the same: then the job points at a file that
            # is gone, and a successor starts over (logged) instead of resuming
            logger.warning("checkpoint %s of %s not recorded; deleted", artifact, self.task.job_id)
            await asyncio.to_thread(self._delete, [artifact])
            raise
        if ours:
            stale, self._checkpoints = self._checkpoints, [artifact]
        else:
            stale = [artifact]
        await asyncio.to_thread(self._delete, stale)
        return ours

    async def discard_checkpoints(self) -> None:
        """The job ended (completed or failed): its checkpoints are of no more use."""
        async with self._writes:
            await asyncio.to_thread(self._delete, self._checkpoints)
            self._checkpoints = []

    def _delete(self, artifacts: list[str]) -> None:
        for artifact in artifacts:
            try:
                self.artifacts.delete(artifact)
            except Exception as error:  # the sweep of old checkpoints takes it later
                logger.warning("could not delete checkpoint %s: %r", artifact, error)


class VideoSteps:
    """A video replica's engine and the reports of the seats it holds."""

    def __init__(
        self, spec: ModelSpec, pipeline: Any, artifacts: ArtifactStore, *, interval_s: float
    ) -> None:
        from models.stepping.wan import WanStepper

        assert spec.stepping is not None
        if type(pipeline).__name__ != "WanPipeline":
            raise ValueError(
                f"{type(pipeline).__name__} has no step-level loop yet; unset the model's "
                "`stepping`"
            )
        self.spec = spec
        self.artifacts = artifacts
        self.interval_s = interval_s
        self._reports: dict[str, SeatReports] = {}
        self.engine = StepEngine(
            ResumingWanSteps(WanStepper(pipeline)),
            max_batch_images=spec.batching.max_batch_size,
            max_pauses=spec.stepping.max_pauses,
            max_idle_device_bytes=spec.stepping.max_idle_device_bytes,
            convert=to_uint8_frames,
            on_step=self._stepped,
        )

    def reports_for(self, task: VideoTask, renew: Renew) -> SeatReports:
        assert self.spec.stepping is not None
        return SeatReports(
            task,
            renew=renew,
            artifacts=self.artifacts,
            loop=asyncio.get_running_loop(),
            interval_s=self.interval_s,
            every_steps=self.spec.stepping.checkpoint_every_steps,
        )

    async def denoise(self, reports: SeatReports) -> SeatOutcome:
        """The job's frames (uint8: ``images[0]``) from a seat of the engine, and what
        its steps cost; ``SeatCancelled`` if it stopped being this dispatch's."""
        checkpoint = await asyncio.to_thread(read_checkpoint, self.artifacts, reports.task)
        job = VideoSeatJob(reports.task, checkpoint)
        self._reports[job.request_key] = reports
        try:
            outcome = await asyncio.wrap_future(self.engine.submit(job))
        except asyncio.CancelledError:
            self.engine.cancel(job.request_key)
            raise
        finally:
            self._reports.pop(job.request_key, None)
        return outcome

    def cancel(self, task: VideoTask) -> None:
        self.engine.cancel(VideoSeatJob(task).request_key)

    def _stepped(self, batch: list[Any]) -> None:
        for seat in batch:
            reports = self._reports.get(seat.job.request_key)
            try:
                if reports is not None:
                    reports.stepped(seat.state)
            except Exception:  # that seat's report is lost; the others' are not
                logger.exception("could not report the step of %s", seat.job.request_id)
        for key, reports in list(self._reports.items()):  # paused ones too
            if reports.cancelled.is_set():
                self.engine.cancel(key)
