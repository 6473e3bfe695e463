"""A scheduler whose model version leaves service (``mediagate models swap`` /
``remove``; its ``user_config`` says ``retired``): what it tells new work, and what
becomes of the work it holds. Both kinds of scheduler use it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Literal

from deployments.scheduler.queue import FairQueue
from deployments.scheduler.settings import VideoSchedulerSettings
from deployments.scheduler.video_queue import VideoQueue
from mediagate.jobs.video import VideoJobLifecycle
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import MediagateError, ModelMoved, ModelRemoved
from mediagate.stores import JobStore

Retired = Literal["moved", "drain", "removed"] | None


def refusal(retired: Retired, model_id: str) -> MediagateError | None:
    """The error for new work that reaches a retired scheduler (``None``: not retired):
    ``moved`` sends its router to the live version, otherwise the model is gone."""
    if retired is None:
        return None
    if retired == "moved":
        return ModelMoved(f"model {model_id} moved to a new version; please retry", retry_after_s=1)
    return ModelRemoved(
        f"the model {model_id!r} was taken out of service; GET /v1/models lists the models served",
        param="model",
    )


def release_queued(queue: FairQueue[Any], retired: Retired, model_id: str) -> int:
    """Fail every queued ticket of a scheduler retired ``removed`` (``model_removed``:
    the router charges nothing). A ``moved`` or ``drain``ing one keeps them: its
    workers serve them before they scale to zero. Returns how many were failed."""
    if retired != "removed":
        return 0
    error = refusal(retired, model_id)
    assert error is not None
    released = list(queue.tickets())
    for ticket in released:
        queue.discard(ticket)
        ticket.fail(error)
    return len(released)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The loop this is called on (Serve builds a replica on its event loop), if any."""
    with contextlib.suppress(RuntimeError):
        return asyncio.get_running_loop()
    return None


def on_loop(loop: asyncio.AbstractEventLoop | None, act: Callable[[], Any]) -> None:
    """Run ``act`` on ``loop``: at once when called there (or with no loop known), else
    handed over (Serve runs a sync ``reconfigure`` on a thread of its pool)."""
    if loop is None or running_loop() is loop:
        act()
    else:
        loop.call_soon_threadsafe(act)


class VideoRetirement:
    """A video scheduler's part in leaving service (mixed into ``VideoScheduler``)."""

    spec: ModelSpec
    settings: VideoSchedulerSettings
    _queue: VideoQueue
    _tasks: list[asyncio.Task[None]]
    _store: JobStore
    _jobs: VideoJobLifecycle

    def _retire(self) -> None:
        """This version leaves service: it claims nothing more. What it queued stays
        queued in the store for the live version (moved), or fails, running or not
        (removed; each worker stops at its next write)."""
        for job_id in [ticket.job.job_id for ticket in self._queue.tickets()]:
            self._queue.remove(job_id)
        if self.settings.retired == "removed":
            self._tasks.append(asyncio.create_task(self._fail_unserved()))

    async def _fail_unserved(self) -> None:
        message = f"the model {self.spec.id!r} was taken out of service; nothing was charged"
        for job in await self._store.active_jobs(self.spec.id):
            await self._jobs.fail_unserved(
                job,
                code="model_removed",
                message=message,
                content_ttl_s=self.settings.content_ttl_s,
            )
