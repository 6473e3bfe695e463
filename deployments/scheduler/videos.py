"""VideoScheduler: one per video model; runs durable jobs through free worker slots.

Jobs live in the state store, not here: this scheduler holds only the order in which
queued jobs are dispatched, and rebuilds it from the store whenever it starts. Every
change of a job's status is a named transition of ``mediagate.jobs.video`` (claim,
expire, re-queue or fail). A reconcile loop keeps memory and store in agreement: a
``queued`` job missing from the queue is enqueued; an ``in_progress`` job whose lease
ran out (its replica or the whole application died) is re-queued, or failed once
``max_attempts`` runs were lost; one whose worker still renews its lease (dispatched
by this scheduler's predecessor, before a restart) holds a slot until it ends; a job
queued past its tier's longest wait fails.
Admission is the image scheduler's (``deployments.scheduler.admission``): the router
asks ``admit`` before it reserves or stores anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from deployments.scheduler.admission import (
    EstimateCheck,
    admit_or_shed,
    estimate_wait_s,
    seat_turn_s,
    updated_service_time,
)
from deployments.scheduler.capacity import ReplicaCounter, WorkerSlots, serve_replica_follower
from deployments.scheduler.in_flight import RecentIds
from deployments.scheduler.metrics import SchedulerMetrics
from deployments.scheduler.queue import Ticket
from deployments.scheduler.retirement import VideoRetirement, on_loop, refusal, running_loop
from deployments.scheduler.settings import VideoSchedulerSettings
from deployments.scheduler.turned_away import TurnedAwayDemand
from deployments.scheduler.video_queue import QueuedVideo, VideoQueue
from deployments.scheduler.video_reports import VideoSchedulerReports
from mediagate.jobs.video import RetryLimits, VideoJobLifecycle, live, overdue
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.clock import Clock, system_clock
from mediagate.protocol.errors import Overloaded
from mediagate.protocol.work import VideoGeneration, VideoOutcome, VideoTask
from mediagate.stores import (
    JobStore,
    StateConfig,
    VideoJobRecord,
    given_or_opened,
    open_state_store,
)

logger = logging.getLogger(__name__)


class VideoScheduler(VideoSchedulerReports, VideoRetirement):
    """Queues a video model's jobs and feeds them, one per slot, to its workers: higher
    priority classes first, round-robin between accounts within a class."""

    def __init__(
        self,
        worker: Any,
        spec: ModelSpec,
        *,
        state: StateConfig | None = None,
        settings: VideoSchedulerSettings | None = None,
        worker_deployment: str | None = None,
        count_replicas: ReplicaCounter | None = None,
        store: JobStore | None = None,
        capacity_refresh_s: float = 0.25,
        clock: Clock = system_clock,
    ) -> None:
        self.spec = spec
        # `args.video`, where video settings are declared; user_config overrides keys live
        self._base_settings = settings or VideoSchedulerSettings()
        self.settings = self._base_settings
        self._worker = worker
        self._store = given_or_opened(store, state, open_state_store, "state")
        self._clock = clock
        self._jobs = VideoJobLifecycle(self._store, clock=clock)
        self._metrics = SchedulerMetrics(self.spec.id)  # the image scheduler's metrics
        self._slots = WorkerSlots(
            count_replicas=count_replicas,
            follow_replicas=(
                serve_replica_follower(worker_deployment)
                if count_replicas is None and worker_deployment is not None
                else None
            ),
            slots_per_replica=self.settings.slots_per_replica,
            refresh_s=capacity_refresh_s,
        )
        self._queue = VideoQueue(self.settings.min_shares)
        self._claiming: set[str] = set()  # taken off the queue, being claimed in the store
        self._reconciling = asyncio.Lock()
        self._classes_seen: set[int] = set()
        self._turned_away = TurnedAwayDemand()  # jobs shed at admission, for autoscaling
        self._running: dict[str, asyncio.Task[None]] = {}
        self._running_class: dict[str, int] = {}  # running job id -> its priority class
        # running on a worker a predecessor dispatched to: id -> class (see _adopt)
        self._adopted: dict[str, int] = {}
        self._dispatched = RecentIds(keep_s=86_400)  # claimed here: never to be adopted
        self._recovered = asyncio.Event()  # the first reconcile pass is done
        self._tasks: list[asyncio.Task[None]] = []
        self._reconcile_now = asyncio.Event()  # the next pass at once, not in reconcile_s
        self.counts = {
            "dispatched": 0,
            "completed": 0,
            "failed": 0,
            "requeued": 0,
            "lost": 0,
            "resumed": 0,  # completed from a lost run's checkpoint (step-level workers)
        }
        self.decisions: Counter[str] = Counter()  # admitted/shed/expired per class
        self.estimate_check = EstimateCheck()
        self._service_s: float | None = None  # measured per completed job
        self._loop = running_loop()  # where a reconfigure from Serve's thread acts
        with contextlib.suppress(RuntimeError):  # Serve constructs us on the replica's loop:
            asyncio.get_running_loop().call_soon(self._ensure_started)  # recover at once

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Live update from ``user_config`` (no replica restart): its keys override the
        application's settings; a key taken out of it goes back to the application's."""
        merged = {**self._base_settings.model_dump(), **config}
        was_standing_by = self.settings.standby
        self.settings = VideoSchedulerSettings.model_validate(merged)
        self._slots.set_slots_per_replica(self.settings.slots_per_replica)
        self._queue.min_shares = dict(self.settings.min_shares)
        if self.settings.retired in ("moved", "removed"):
            on_loop(self._loop, self._retire)
        if was_standing_by and not self.settings.standby:  # routed to: the store's jobs now
            on_loop(self._loop, self._reconcile_now.set)

    def _ensure_started(self) -> None:
        """Start the loops outside the calling request's context (Serve cancels the
        calls a cancelled request made: the worker calls are nobody's children)."""
        if not self._tasks:
            fresh = contextvars.Context()
            loops = (self._dispatch_loop(), self._reconcile_loop(), self._slots.watch())
            self._tasks = [fresh.run(asyncio.create_task, loop) for loop in loops]

    async def start(self) -> None:
        """Begin work without waiting for a request (recovery after a restart)."""
        self._ensure_started()

    async def admit(
        self, account_id: str, priority_class: int, max_wait_s: float, max_queued: int | None
    ) -> float | None:
        """Decide, before the router reserves or stores anything, whether a new job of
        this account and tier may queue: raise ``Overloaded`` (503 with Retry-After) when
        its class's queue holds ``max_queued`` jobs or it would not start well within
        ``max_wait_s``; else return the estimated wait (None before any job was measured)."""
        self._ensure_started()
        if (retired := refusal(self.settings.retired, self.spec.id)) is not None:
            raise retired
        probe = QueuedVideo("", account_id, priority_class)
        try:
            return admit_or_shed(
                ahead=self._queue.ahead_of(probe),
                busy=self._slots.busy,
                slots=self._slots.for_estimates,
                service_s=self._service_s,
                max_wait_s=max_wait_s,
                queued_in_class=self._queue.queued(priority_class),
                max_queued=max_queued,
                share_above=self._queue.share_above(priority_class),
            )
        except Overloaded:
            self._count_shed(account_id, priority_class)
            raise

    def _estimate_s(self, video: QueuedVideo) -> float | None:
        if self._service_s is None:
            return None
        return estimate_wait_s(
            ahead=self._queue.ahead_of(video),
            busy=self._slots.busy,
            slots=self._slots.for_estimates,
            service_s=self._service_s,
            share_above=self._queue.share_above(video.priority_class),
        )

    async def enqueue(self, account_id: str, job_id: str, priority_class: int = 0) -> int:
        """Queue a job the router has stored as ``queued``; returns its position (1 = next)."""
        self._ensure_started()
        retired = self.settings.retired
        if retired in ("moved", "removed") and (error := refusal(retired, self.spec.id)):
            raise error  # the live version takes it from the store (or it was removed)
        if not self._holds(job_id):
            video = QueuedVideo(job_id, account_id, priority_class)
            self._queue.add(video, now=self._clock(), estimated_wait_s=self._estimate_s(video))
            self._count("admitted", priority_class)
            self._slots.changed.set()
        return self.position(job_id)

    def _holds(self, job_id: str) -> bool:
        return any(
            job_id in held for held in (self._queue, self._claiming, self._running, self._adopted)
        )

    def position(self, job_id: str) -> int:
        """1-based place in the queue; 0 when it is not queued here."""
        return self._queue.position_of(job_id)

    async def cancel(self, account_id: str, job_id: str) -> bool:
        """Drop a deleted job from the queue; a running one stops at its next step by itself."""
        return self._queue.remove(job_id)

    async def _dispatch_loop(self) -> None:
        await self._recovered.wait()  # what a predecessor left running holds its slots
        while True:
            await self._slots.changed.wait()
            self._slots.changed.clear()
            while len(self._queue) and self._slots.free:
                busy, slots = self._slots.busy, self._slots.capacity
                self._queue.held_back = self.settings.held_back(busy=busy, slots=slots)
                if self._queue.head() is None:
                    break  # what waits is held back: the other seats are for higher classes
                ticket = self._queue.pop_next()
                video = ticket.job
                self._claiming.add(video.job_id)  # neither queued nor running: not lost
                try:
                    job = await self._claim(ticket)
                except Exception as error:  # store outage: keep its place, try again soon
                    logger.warning("could not claim %s: %s", video.job_id, error)
                    self._queue.add(video, now=self._clock(), first=True)
                    asyncio.get_running_loop().call_later(1.0, self._slots.changed.set)
                    break
                finally:
                    self._claiming.discard(video.job_id)
                if job is None:
                    continue  # deleted, taken, or waited too long: nothing to run
                self._dispatched.add(job.id, self._clock())
                self._slots.acquire()
                self._running_class[video.job_id] = video.priority_class
                self._running[video.job_id] = asyncio.create_task(self._run(job))

    async def _claim(self, ticket: Ticket[QueuedVideo]) -> VideoJobRecord | None:
        current = await self._store.get_job(ticket.job.account_id, ticket.job.job_id)
        if current is None or current.status != "queued":
            return None
        now = self._clock()
        if overdue(current, now):
            await self._expire(current, ticket)
            return None
        claimed = await self._jobs.claim(
            current, lease_s=self.settings.lease_s, model_version=self.spec.version
        )
        if claimed is not None:
            self.estimate_check.record(
                ticket.job.priority_class,
                estimated_s=ticket.estimated_wait_s,
                waited_s=now - ticket.enqueued_at,
            )
        return claimed

    async def _expire(self, job: VideoJobRecord, ticket: Ticket[QueuedVideo] | None) -> None:
        """A job that waited past its tier's longest wait before its first dispatch fails
        (``queue_timeout``, nothing charged) and leaves the queue."""
        expired = await self._jobs.expire_in_queue(job, content_ttl_s=self.settings.content_ttl_s)
        if expired is None:
            return  # dispatched, deleted or expired meanwhile
        self._queue.remove(job.id)
        self._count("expired", expired.priority_class)
        if ticket is not None:
            self.estimate_check.record(
                expired.priority_class,
                estimated_s=ticket.estimated_wait_s,
                waited_s=self._clock() - ticket.enqueued_at,
            )
        logger.info("job %s waited past its tier's limit: failed", job.id)

    async def _run(self, job: VideoJobRecord) -> None:
        task = VideoTask(
            job_id=job.id,
            account_id=job.account_id,
            attempt=job.attempt,
            generation=VideoGeneration.model_validate(job.generation),
            lease_s=self.settings.lease_s,
            content_ttl_s=self.settings.content_ttl_s,
            priority_class=job.priority_class,
            checkpoint=job.checkpoint.artifact if job.checkpoint else None,
        )
        self.counts["dispatched"] += 1
        started_at = self._clock()
        try:
            outcome: VideoOutcome = await self._worker.run.remote(task)
        except Exception as error:  # the replica died or could not be reached
            logger.warning("worker lost job %s (attempt %d): %r", job.id, job.attempt, error)
            self.counts["lost"] += 1
            try:
                await self._requeue_or_fail(job)
            except Exception as store_error:  # its lease runs out; reconcile takes it from there
                logger.warning("could not re-queue %s now: %s", job.id, store_error)
        else:
            if outcome.status in ("completed", "failed"):
                self.counts[outcome.status] += 1
                self._metrics.finished(outcome.status)
            self.counts["resumed"] += outcome.resumed_at_step > 0
            if outcome.status == "completed":  # what admission estimates waits from
                took_s = self._clock() - started_at
                if outcome.service_s is not None:  # a seat, and the decode and files after
                    outside_s = max(0.0, took_s - outcome.inference_s)
                    seats = self.settings.slots_per_replica
                    took_s = seat_turn_s(outcome.service_s, seats) + outside_s
                self._service_s = updated_service_time(self._service_s, took_s)
        finally:
            self._running.pop(job.id, None)
            self._running_class.pop(job.id, None)
            self._slots.release()

    async def _requeue_or_fail(self, job: VideoJobRecord) -> None:
        """A dispatch that ended without an answer: run it again, or fail it for good."""
        limits = RetryLimits(self.settings.max_attempts, self.settings.max_dispatches)
        updated = await self._jobs.requeue_or_fail(
            job, limits=limits, content_ttl_s=self.settings.content_ttl_s
        )
        if updated is None:
            return  # it finished, was deleted, or was already taken back
        if updated.status == "failed":
            self.counts["failed"] += 1
            self._metrics.finished("failed")
            return
        self.counts["requeued"] += 1
        if self.settings.retired in ("moved", "removed"):
            return  # queued in the store: the live version takes it (or it was failed)
        if updated.worker_started_at is None:  # Serve may still route to a dead replica
            await asyncio.sleep(self.settings.redispatch_delay_s)
        # First in line: it was accepted before anything now queued. (Pushed directly:
        # the job may still count as running here while its dispatch unwinds.)
        queued = QueuedVideo(updated.id, updated.account_id, updated.priority_class)
        self._queue.add(queued, now=self._clock(), first=True)
        self._slots.changed.set()

    async def reconcile(self) -> None:
        """One pass of bringing memory in line with the store (see the module docstring);
        passes never overlap (the loop's and a caller's would act on the same jobs)."""
        async with self._reconciling:
            await self._reconcile_pass()

    async def _reconcile_pass(self) -> None:
        if self.settings.standby:  # the live version holds the model's jobs until routed
            return
        if self.settings.retired == "removed":  # what reaches the store meanwhile fails too
            return await self._fail_unserved()
        active = await self._store.active_jobs(self.spec.id)
        now = self._clock()
        worked_on = {job.id for job in active if job.status == "in_progress" and live(job, now)}
        ended = [job_id for job_id in self._adopted if job_id not in worked_on]
        for job_id in ended:  # it finished, or its worker died too (re-queued below)
            del self._adopted[job_id]
        self._adopt(job for job in active if job.id in worked_on)
        self._recovered.set()
        try:
            for job in active:
                if job.status == "queued" and overdue(job, now):
                    await self._expire(job, self._queue.ticket(job.id))
                elif self._holds(job.id) or job.id in worked_on:
                    continue
                elif job.status == "queued" and self.settings.retired != "moved":
                    await self.enqueue(job.account_id, job.id, job.priority_class)
                else:
                    logger.warning("job %s lost its worker (lease ran out)", job.id)
                    await self._requeue_or_fail(job)
        finally:  # freed once re-queued: a job that lost its worker goes first
            for _ in ended:
                self._slots.release()

    def _adopt(self, running: Iterable[VideoJobRecord]) -> None:
        """Jobs a predecessor dispatched, still renewed by their workers, hold a slot
        each until they end (a job sent to that busy replica would wait there while its
        lease ran out). Never one dispatched here: it may have just ended."""
        now = self._clock()
        if self.settings.retired is not None:
            return  # leaving service: it waits for its own runs only
        for job in running:
            if self._holds(job.id) or self._dispatched.seen(job.id, now):
                continue
            if job.model_version not in (None, self.spec.version):
                continue  # another version of the model runs it (a swap): not ours
            logger.info("job %s runs on a worker dispatched to before; adopted", job.id)
            self._adopted[job.id] = job.priority_class
            self._slots.acquire()

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception as error:  # a store outage must not end the loop
                logger.warning("reconcile of %s failed: %s", self.spec.id, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconcile_now.wait(), self.settings.reconcile_s)
            self._reconcile_now.clear()

    async def shutdown(self) -> None:
        for task in [*self._tasks, *self._running.values()]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
