"""Scheduler: one per model; owns the queue and dispatches into free worker slots only.

Workers run one batch per slot and keep ``max_ongoing_requests`` equal to their slots,
so nothing waits inside a worker: waiting happens here, where the queue discipline
applies and where newly started replicas can take the next batch. The scheduler knows
its capacity (running worker replicas x slots) by asking the Serve controller, and
reports queue length and in-flight work for autoscaling.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Hashable
from typing import Any

from deployments.scheduler.admission import (
    EstimateCheck,
    admit_or_shed,
    updated_service_time,
)
from deployments.scheduler.capacity import ReplicaCounter, WorkerSlots, serve_replica_follower
from deployments.scheduler.deadlines import Deadlines
from deployments.scheduler.image_reports import ImageSchedulerReports
from deployments.scheduler.in_flight import (
    InFlightBatch,
    RecentIds,
    run_on_worker,
    streamed_answer,
    with_scheduler_timings,
    worker_was_lost,
)
from deployments.scheduler.metrics import SchedulerMetrics
from deployments.scheduler.preemption import batch_to_preempt, class_to_preempt_for
from deployments.scheduler.queue import FairQueue, Ticket
from deployments.scheduler.retirement import on_loop, refusal, release_queued, running_loop
from deployments.scheduler.settings import ImageSchedulerSettings
from deployments.scheduler.step_reports import StepLevelReport
from deployments.scheduler.turned_away import TurnedAwayDemand
from mediagate.protocol.catalog import Batching, ModelSpec
from mediagate.protocol.clock import Clock, system_clock
from mediagate.protocol.errors import (
    GenerationFailed,
    InvalidRequest,
    MediagateError,
    ModelUnavailable,
    Overloaded,
    unwrap,
)
from mediagate.protocol.work import (
    ImageJob,
    ImageResult,
    PartialImage,
    StreamQueued,
    request_key,
)

logger = logging.getLogger(__name__)


class Scheduler(ImageSchedulerReports):
    """Queues jobs for one model and feeds them, batched by shape, to free worker slots."""

    def __init__(
        self,
        worker: Any,
        spec: ModelSpec,
        *,
        worker_deployment: str | None = None,
        count_replicas: ReplicaCounter | None = None,
        slots_per_replica: int = 1,
        capacity_refresh_s: float = 0.25,
        base_config: dict[str, Any] | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.spec = spec
        self._base_config = base_config or {}  # under every reconfigure (step-level terms)
        self._worker = worker
        self._clock = clock
        self._queue: FairQueue[ImageJob] = FairQueue()
        self._service_s: dict[Hashable, float] = {}  # measured, per batch shape
        self.counts: Counter[str] = Counter()  # admitted/shed/expired per class
        self.estimate_check = EstimateCheck()
        self._metrics = SchedulerMetrics(self.spec.id)
        self._step_level = StepLevelReport()
        self._classes_seen: set[int] = set()
        self._turned_away = TurnedAwayDemand()  # shed here and by routers, for autoscaling
        self._in_flight: dict[int, InFlightBatch] = {}  # what each busy slot serves
        self._deadlines: Deadlines[ImageJob] = Deadlines()
        # Request ids, remembered for a while: those whose batch was dispatched (their
        # quota is spent even if the caller leaves) and those withdrawn before that.
        self._started = RecentIds()
        self._withdrawn = RecentIds()
        self._batch_ids = 0
        self.settings = ImageSchedulerSettings(slots_per_replica=slots_per_replica)
        self._batching: Batching = self.spec.batching
        self._slots = WorkerSlots(
            count_replicas=count_replicas,
            follow_replicas=(
                serve_replica_follower(worker_deployment)
                if count_replicas is None and worker_deployment is not None
                else None
            ),
            slots_per_replica=slots_per_replica,
            refresh_s=capacity_refresh_s,
        )
        self._wakeup = self._slots.changed
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._loop = running_loop()  # where a reconfigure from Serve's thread acts
        self._capacity_watcher: asyncio.Task[None] | None = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Live update from the Serve config's ``user_config`` (no replica restart): the
        whole config, a key left out reads as the application's base config, else its
        default (batching: the catalog's)."""
        self.settings = ImageSchedulerSettings.model_validate({**self._base_config, **config})
        self._batching = self.settings.batching.over(self.spec.batching)
        self._slots.set_slots_per_replica(self.settings.slots_per_replica)
        self._queue.min_shares = dict(self.settings.min_shares)
        on_loop(
            self._loop, lambda: release_queued(self._queue, self.settings.retired, self.spec.id)
        )

    def _ensure_started(self) -> None:
        """Start the loops outside the first caller's context (Serve would take their
        worker calls for that request's children and cancel them with it)."""
        if self._dispatcher is None:
            fresh = contextvars.Context()
            self._dispatcher = fresh.run(asyncio.create_task, self._dispatch_loop())
            self._capacity_watcher = fresh.run(asyncio.create_task, self._slots.watch())

    async def submit(self, job: ImageJob) -> ImageResult:
        """Queue ``job`` and wait for its result; leaving early takes it off the queue."""
        ticket = self._enqueue(job)
        assert ticket.future is not None
        try:
            return await ticket.future
        except asyncio.CancelledError:
            self._left(ticket)
            raise

    async def submit_streaming(
        self, job: ImageJob
    ) -> AsyncIterator[StreamQueued | PartialImage | ImageResult]:
        """``submit``, streamed (``handle.options(stream=True)``): ``StreamQueued`` once
        admitted (a refusal raises before anything is sent), the job's partial images as
        the worker makes them, then its result."""
        answer = streamed_answer(self._enqueue(job, streamed=True), self._left)
        async with contextlib.aclosing(answer) as items:  # closed at once if we are
            async for item in items:
                yield item

    def _enqueue(self, job: ImageJob, *, streamed: bool = False) -> Ticket[ImageJob]:
        """Admit ``job`` (or shed it: ``Overloaded``) and queue its ticket."""
        self._ensure_started()
        if (retired := refusal(self.settings.retired, self.spec.id)) is not None:
            raise retired  # this version left service: nothing queued here any more
        if self._withdrawn.seen(job.request_key, self._clock()):  # its caller left first
            raise InvalidRequest(
                "this request id belongs to a request withdrawn moments ago; send a new one",
                code="request_id_reused",
            )
        cls = job.priority_class
        try:
            estimated_wait_s = admit_or_shed(
                ahead=self._queue.ahead_of(job),
                busy=self._slots.busy,
                slots=self.capacity,
                service_s=self._service_s.get(job.batch_key),
                max_wait_s=job.max_wait_s,
                queued_in_class=self._queue.queued(cls),
                max_queued=job.max_queued,
                share_above=self._queue.share_above(cls),
            )
        except Overloaded:
            self._count_shed(job)
            raise
        self._count("admitted", cls)
        now = self._clock()
        ticket = Ticket(
            job=job,
            enqueued_at=now,
            future=asyncio.get_running_loop().create_future(),
            deadline=now + job.max_wait_s,
            estimated_wait_s=estimated_wait_s,
            partials=asyncio.Queue() if streamed else None,
        )
        self._queue.push(ticket)
        self._deadlines.add(ticket, queued=len(self._queue))
        self._wakeup.set()
        return ticket

    def _left(self, ticket: Ticket[ImageJob]) -> None:
        """Its submitter went away: a ticket still queued leaves the queue; a running
        batch that no caller waits for any more stops at its next step."""
        if self._queue.discard(ticket):
            self._withdrawn.add(ticket.job.request_key, self._clock())
            logger.info("dropped queued request %s: its caller went away", ticket.job.request_id)
            return
        if ticket.future is not None:
            ticket.future.cancel()  # nothing more to send it
        for batch in self._in_flight.values():
            stoppable = batch.response is not None and not batch.preempted
            if stoppable and ticket in batch.tickets and all(t.answered for t in batch.tickets):
                batch.abandoned = True
                batch.response.cancel()  # the slot goes to waiting work
                logger.info("stopping batch %d: its callers went away", batch.batch_id)

    def withdraw(self, account_id: str, request_id: str) -> bool:
        """A router whose caller went away asks whether the request had started running:
        True (a worker took it: its quota is spent), or False (it never will: it left the
        queue, or never reached it; a late arrival of it is refused)."""
        key = request_key(account_id, request_id)
        if self._started.seen(key, self._clock()):
            return True
        self._withdrawn.add(key, self._clock())
        return False

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            hold_s = self._dispatch_ready()
            if hold_s is not None:
                asyncio.get_running_loop().call_later(hold_s, self._wakeup.set)

    def _dispatch_ready(self) -> float | None:
        """Dispatch batches while slots are free; returns how long to hold a partial batch."""
        self._drop_expired()
        while len(self._queue) and self._slots.free:
            self._queue.held_back = self.settings.held_back(
                busy=self._slots.busy, slots=self.capacity
            )
            head = self._queue.head()
            if head is None:
                break  # what waits is held back: the other seats are for higher classes
            max_images = self._batching.max_batch_size
            hold_s = self._queue.hold_for_fuller_batch_s(
                max_images=max_images,
                batch_wait_s=self._batching.batch_wait_s,
                waited_s=self._clock() - head.enqueued_at,
            )
            if hold_s is not None:
                return hold_s
            batch, now = [], self._clock()
            for ticket in self._queue.take_batch(max_images):
                if self._withdrawn.seen(ticket.job.request_key, now):  # its router said it left
                    ticket.fail(GenerationFailed("the request was withdrawn by its caller"))
                elif not ticket.answered:
                    batch.append(ticket)
            if not batch:
                continue
            for ticket in batch:
                self._started.add(ticket.job.request_key, now)
            self.estimate_check.record_first_starts(batch, now)
            self._metrics.dispatched(sum(ticket.job.images for ticket in batch))
            self._slots.acquire()
            self._batch_ids += 1
            in_flight = InFlightBatch(self._batch_ids, batch, self._clock())
            self._in_flight[in_flight.batch_id] = in_flight
            task = asyncio.create_task(self._run(in_flight))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if len(self._queue) and not self._slots.free:
            self._preempt_for_waiting_work()
        return None

    def _preempt_for_waiting_work(self) -> None:
        """Take back at most one lower-class batch per waiting request of the top class."""
        stopping = sum(1 for b in self._in_flight.values() if b.preempted or b.abandoned)
        waiting_class = class_to_preempt_for(self._queue.length_by_class(), stopping=stopping)
        if waiting_class is None:
            return
        victim = batch_to_preempt(
            [
                batch.view(self._service_s.get(batch.tickets[0].job.batch_key))
                for batch in self._in_flight.values()
                if batch.response is not None
            ],
            waiting_class,
            now=self._clock(),
            policy=self.settings.preemption,
        )
        if victim is None:
            return
        in_flight = self._in_flight[victim.batch_id]
        in_flight.preempted = True
        in_flight.response.cancel()  # the worker stops at its next denoising step
        self._queue.charge(waiting_class)  # the steps it had done are lost to lower classes
        logger.info(
            "preempting batch of class %d (%s) for class %d work",
            in_flight.priority_class,
            ", ".join(t.job.request_id for t in in_flight.tickets),
            waiting_class,
        )

    def _drop_expired(self) -> None:
        """Tickets past their tier's longest wait leave before they reach a worker (the
        deadline heap's due entries only: no walk of the queue)."""
        now = self._clock()
        for ticket in self._deadlines.due(now):
            if not self._queue.discard(ticket):
                continue  # dispatched, or gone
            self._count("expired", ticket.job.priority_class)
            self.estimate_check.record(
                ticket.job.priority_class,
                estimated_s=ticket.estimated_wait_s,
                waited_s=now - ticket.enqueued_at,
            )
            ticket.fail(
                Overloaded(
                    "the service is busy: your request waited longer than your tier allows; "
                    "please retry later",
                    retry_after_s=max(1.0, now - ticket.enqueued_at),
                )
            )

    async def _run(self, in_flight: InFlightBatch) -> None:
        batch = in_flight.tickets
        try:
            sent = time.perf_counter()  # for the dispatch round trip (Server-Timing)
            results = await run_on_worker(self._worker, in_flight)
            round_trip_ms = (time.perf_counter() - sent) * 1000
        except Exception as error:
            if in_flight.abandoned:
                return  # stopped because nobody waits for it: nothing to answer
            if in_flight.preempted:
                self._requeue(batch, preempted=True)
                return
            if worker_was_lost(error):
                self._after_worker_loss(batch, error)
                return
            cause = unwrap(error)
            if not isinstance(cause, MediagateError):
                logger.error("worker call failed: %r", error)
                cause = GenerationFailed(f"model {self.spec.id} is unavailable; please retry")
            for ticket in batch:
                ticket.fail(cause)
        else:
            key = batch[0].job.batch_key
            self._service_s[key] = updated_service_time(
                self._service_s.get(key), self.measured_service_s(in_flight, results)
            )
            for ticket, result in zip(batch, results, strict=True):
                self._step_level.record(result, ticket.job.priority_class)
                ticket.answer(with_scheduler_timings(result, ticket, in_flight, round_trip_ms))
        finally:
            del self._in_flight[in_flight.batch_id]
            self._slots.release()

    def _requeue(self, batch: list[Ticket[ImageJob]], preempted: bool) -> None:
        """A batch taken back (preempted, or its worker lost) goes back first in line:
        its callers still wait. They started in time, so their queue deadline no longer
        applies: expiring one now would fail a request after it had run."""
        for ticket in reversed(batch):
            if ticket.answered:
                continue
            ticket.deadline = math.inf
            self._queue.requeue(ticket)
            if preempted:
                ticket.preemptions += 1
                self._count("preempted", ticket.job.priority_class)
        self._wakeup.set()

    def _after_worker_loss(self, batch: list[Ticket[ImageJob]], error: BaseException) -> None:
        """The replica running the batch died or could not be reached: its requests run
        again, once, after ``redispatch_delay_s`` (Serve learns of a dead replica only
        when a call to it fails); a second loss is a 503 (a request that kills workers
        must not go on killing them)."""
        logger.warning("worker lost under %d request(s): %r", len(batch), error)
        self.counts["worker_lost"] += 1
        lost_twice = f"the worker running your request on {self.spec.id} stopped; retry shortly"
        for ticket in batch:
            ticket.workers_lost += 1
            if ticket.workers_lost > 1:
                ticket.fail(ModelUnavailable(lost_twice, retry_after_s=2))
        again = [ticket for ticket in batch if ticket.workers_lost == 1]
        asyncio.get_running_loop().call_later(
            self.settings.redispatch_delay_s, self._requeue, again, False
        )

    async def shutdown(self) -> None:
        for task in (self._dispatcher, self._capacity_watcher, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
