"""A video job's life, as named transitions. Each is one compare-and-set on the job
(``update_job`` with the statuses, and the attempt, it expects), so a worker that lost
its lease, a scheduler that restarted and a user who deleted the job can never
overwrite one another; a transition that ends the job settles its quota reservation
here and nowhere else: committed when it completed, released when it failed on our side,
waited too long, or was deleted before it ended. A transition that ends the job also
writes its webhook event (``video.completed`` or ``video.failed``) to the outbox, in the
same compare-and-set: the event exists if and only if the job ended.

    queued --claim--> in_progress --complete--> completed
      ^  \\                |   \\------fail------> failed (generation_failed)
      |   \\--expire----->|----requeue_or_fail--> failed (worker_lost)
      \\-------------------/     (or back to queued)
    queued --expire_in_queue--> failed (queue_timeout)
    any --delete--> gone
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mediagate.access.ledger import finish_reservation
from mediagate.protocol.clock import Clock, system_clock
from mediagate.stores import JobStore, VideoJobRecord
from mediagate.stores.records import JobCheckpoint, OutboxEvent
from mediagate.webhooks.events import job_finished_event

logger = logging.getLogger(__name__)


def overdue(job: VideoJobRecord, now: float) -> bool:
    """Queued past its tier's longest wait without ever being dispatched. A job that
    was dispatched once (re-queued after a lost worker) started in time and is not
    expired, as the image scheduler spares preempted requests."""
    return job.attempt == 0 and job.queue_deadline_at is not None and job.queue_deadline_at < now


def live(job: VideoJobRecord, now: float) -> bool:
    """Held by a worker that still renews its lease (or by a dispatch still on its way)."""
    return job.lease_expires_at is not None and job.lease_expires_at >= now


@dataclass(frozen=True)
class RetryLimits:
    """When a job whose dispatch ended without an answer fails instead of running again."""

    max_attempts: int  # runs a worker took up and lost
    max_dispatches: int  # dispatches in all, reached or not


class VideoJobLifecycle:
    """The transitions of video jobs in ``store``; ``clock`` is Unix time."""

    def __init__(self, store: JobStore, *, clock: Clock = system_clock) -> None:
        self.store = store
        self.clock = clock

    async def create(self, job: VideoJobRecord) -> None:
        """A new ``queued`` job (its reservation already held)."""
        await self.store.create_job(job)

    async def claim(
        self, job: VideoJobRecord, *, lease_s: float, model_version: str | None = None
    ) -> VideoJobRecord | None:
        """``queued -> in_progress`` with ``attempt + 1`` (the dispatch's fence) and a
        lease, by the scheduler of ``model_version``; ``None`` if it is no longer the
        queued ``job`` (deleted, taken, expired)."""
        now = self.clock()
        return await self.store.update_job(
            job.account_id,
            job.id,
            expect_status=("queued",),
            expect_attempt=job.attempt,
            changes={
                "status": "in_progress",
                "attempt": job.attempt + 1,
                "started_at": now,
                "lease_expires_at": now + lease_s,
                "worker_started_at": None,
                "model_version": model_version,
                # resumed from its checkpoint, a job's progress goes back to that step only
                "progress": job.checkpoint.progress if job.checkpoint else 0,
            },
        )

    async def expire_in_queue(
        self, job: VideoJobRecord, *, content_ttl_s: float
    ) -> VideoJobRecord | None:
        """``queued -> failed`` (``queue_timeout``) for a job that waited past its tier's
        longest wait before its first dispatch; its slot is given back, nothing charged."""
        now = self.clock()
        limit_s = (job.queue_deadline_at or now) - job.created_at
        expired = await self.store.update_job(
            job.account_id,
            job.id,
            expect_status=("queued",),
            expect_attempt=0,
            changes={
                "status": "failed",
                "completed_at": now,
                "expires_at": now + content_ttl_s,
                "error_code": "queue_timeout",
                "error_message": f"this video waited longer than your tier allows "
                f"({limit_s:g}s) for a free worker; please submit it again",
            },
            events=[job_finished_event(job.account_id, job.id, "video.failed", now)],
        )
        await self._settle(expired, commit=False)
        return expired

    async def requeue_or_fail(
        self, job: VideoJobRecord, *, limits: RetryLimits, content_ttl_s: float
    ) -> VideoJobRecord | None:
        """A dispatch that ended without an answer (its replica died or was never
        reached): ``in_progress -> queued`` to run again, or ``-> failed``
        (``worker_lost``) once the limits are reached. ``None`` if it had moved on."""
        current = await self.store.get_job(job.account_id, job.id)
        if current is None or current.status != "in_progress" or current.attempt != job.attempt:
            return None  # it finished, was deleted, or was already taken back
        started = current.worker_started_at is not None
        runs_lost = current.runs_lost + int(started)
        now = self.clock()
        changes: dict[str, Any] = {"lease_expires_at": None, "runs_lost": runs_lost}
        if runs_lost >= limits.max_attempts or current.attempt >= limits.max_dispatches:
            reason = (
                f"the worker running this video stopped {runs_lost} times"
                if started
                else f"no worker took this video up after {current.attempt} dispatches"
            )
            changes |= {
                "status": "failed",
                "completed_at": now,
                "expires_at": now + content_ttl_s,
                "error_code": "worker_lost",
                "error_message": f"{reason}; please submit it again",
                "checkpoint": None,  # its file goes with the sweep of old checkpoints
            }
        else:
            # to run again, from its checkpoint if it has one
            resumes_at = current.checkpoint.progress if current.checkpoint else 0
            changes |= {"status": "queued", "progress": resumes_at}
        events: list[OutboxEvent] = []
        if changes["status"] == "failed":
            events.append(job_finished_event(job.account_id, job.id, "video.failed", now))
        updated = await self.store.update_job(
            job.account_id,
            job.id,
            expect_status=("in_progress",),
            expect_attempt=job.attempt,
            changes=changes,
            events=events,
        )
        if updated is not None and updated.status == "failed":
            await self._settle(updated, commit=False)  # a server-side failure costs nothing
        return updated

    async def renew(
        self,
        account_id: str,
        job_id: str,
        attempt: int,
        *,
        lease_s: float,
        progress: int | None = None,
        starting: bool = False,
        checkpoint: JobCheckpoint | None = None,
    ) -> bool:
        """The worker's heartbeat: extend the lease (record progress, or a checkpoint
        written; mark when it took the job up). ``False`` if the job is no longer this
        dispatch's."""
        now = self.clock()
        changes: dict[str, Any] = {"lease_expires_at": now + lease_s}
        if progress is not None:
            changes["progress"] = progress
        if checkpoint is not None:
            changes["checkpoint"] = checkpoint.model_dump()
        if starting:
            changes["worker_started_at"] = now
        return await self._write(account_id, job_id, attempt, changes) is not None

    async def complete(
        self,
        account_id: str,
        job_id: str,
        attempt: int,
        *,
        artifacts: dict[str, str],
        content_ttl_s: float,
    ) -> VideoJobRecord | None:
        """``in_progress -> completed`` with its files, and the quota committed; ``None``
        if the job is no longer this dispatch's (the caller then discards the files)."""
        now = self.clock()
        completed = await self._write(
            account_id,
            job_id,
            attempt,
            {
                "status": "completed",
                "progress": 100,
                "completed_at": now,
                "expires_at": now + content_ttl_s,
                "lease_expires_at": None,
                "artifacts": artifacts,
                "checkpoint": None,  # the worker deletes it
            },
            events=[job_finished_event(account_id, job_id, "video.completed", now)],
        )
        await self._settle(completed, commit=True)
        return completed

    async def fail(
        self,
        account_id: str,
        job_id: str,
        attempt: int,
        *,
        message: str,
        content_ttl_s: float,
        code: str = "generation_failed",
    ) -> VideoJobRecord | None:
        """``in_progress -> failed`` on the model's side; the quota is released."""
        now = self.clock()
        failed = await self._write(
            account_id,
            job_id,
            attempt,
            {
                "status": "failed",
                "completed_at": now,
                "expires_at": now + content_ttl_s,
                "lease_expires_at": None,
                "error_code": code,
                "error_message": message,
                "checkpoint": None,  # the worker deletes it
            },
            events=[job_finished_event(account_id, job_id, "video.failed", now)],
        )
        await self._settle(failed, commit=False)
        return failed

    async def fail_unserved(
        self, job: VideoJobRecord, *, code: str, message: str, content_ttl_s: float
    ) -> VideoJobRecord | None:
        """``queued`` or ``in_progress -> failed`` for a reason of the service's (its model
        was taken out of service): nothing is charged. A running job's worker stops at
        its next write (the attempt it holds no longer matches). ``None`` if the job
        moved on first."""
        now = self.clock()
        failed = await self.store.update_job(
            job.account_id,
            job.id,
            expect_status=("queued", "in_progress"),
            expect_attempt=job.attempt,
            changes={
                "status": "failed",
                "completed_at": now,
                "expires_at": now + content_ttl_s,
                "lease_expires_at": None,
                "error_code": code,
                "error_message": message,
                "checkpoint": None,  # its file goes with the sweep of old checkpoints
            },
            events=[job_finished_event(job.account_id, job.id, "video.failed", now)],
        )
        await self._settle(failed, commit=False)
        return failed

    async def delete(self, account_id: str, job_id: str) -> VideoJobRecord | None:
        """Remove the job; a reservation it still held (it had not ended) is released."""
        deleted = await self.store.delete_job(account_id, job_id)
        await self._settle(deleted, commit=False)  # ended jobs have settled: a no-op then
        return deleted

    async def _write(
        self,
        account_id: str,
        job_id: str,
        attempt: int,
        changes: dict[str, Any],
        events: list[OutboxEvent] | None = None,
    ) -> VideoJobRecord | None:
        """Change the job only while it is still dispatch ``attempt``'s (in progress)."""
        return await self.store.update_job(
            account_id,
            job_id,
            expect_status=("in_progress",),
            expect_attempt=attempt,
            changes=changes,
            events=events or (),
        )

    async def _settle(self, job: VideoJobRecord | None, *, commit: bool) -> None:
        """Commit or release the job's reservation, once; a failure here is logged and the
        reservation then expires by itself (its slot frees within its TTL)."""
        if job is None or job.reservation_id is None:
            return
        try:
            await finish_reservation(self.store, job.account_id, job.reservation_id, commit=commit)
        except Exception as error:
            logger.warning("could not settle reservation %s: %r", job.reservation_id, error)
