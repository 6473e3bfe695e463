"""What an image scheduler keeps about work it has handed out: the batch on each busy
slot, the timings it adds to results, and the request ids it must remember for a while
(dispatched ones, and ones withdrawn before they ran)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from deployments.scheduler.preemption import RunningBatch
from deployments.scheduler.queue import Ticket
from deployments.streams import items_until
from mediagate.protocol.errors import GenerationFailed, caused_by
from mediagate.protocol.work import ImageJob, ImageResult, PartialImage, StreamQueued

# A worker call that ended for these reasons says nothing about the requests it ran:
# the replica died, or Serve could not reach one.
WORKER_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def worker_was_lost(error: BaseException) -> bool:
    """Whether a worker call failed because its replica died or could not be reached
    (not because of the requests it ran)."""
    return caused_by(error, WORKER_LOST)


class InFlightBatch:
    """One batch on a worker slot: its tickets, the worker call, and whether it is
    being taken back for higher-priority work."""

    def __init__(self, batch_id: int, tickets: list[Ticket[ImageJob]], started_at: float) -> None:
        self.batch_id = batch_id
        self.tickets = tickets
        self.started_at = started_at
        self.priority_class = tickets[0].job.priority_class
        self.response: Any = None
        self.preempted = False
        self.abandoned = False  # stopped because none of its callers waits any more

    def jobs(self) -> list[ImageJob]:
        """Its jobs as the worker gets them: each with the wait its tier still allows
        (what it spent in this queue is spent), which a step-level worker holds a seat
        to before its first step."""
        return [
            ticket.job.model_copy(
                update={
                    "max_wait_s": max(
                        0.001, ticket.job.max_wait_s - (self.started_at - ticket.enqueued_at)
                    )
                }
            )
            for ticket in self.tickets
        ]

    def view(self, expected_s: float | None) -> RunningBatch:
        return RunningBatch(
            batch_id=self.batch_id,
            priority_class=self.priority_class,
            started_at=self.started_at,
            expected_s=expected_s,
            preemptions=max(ticket.preemptions for ticket in self.tickets),
            stopping=self.preempted or self.abandoned,
        )


async def run_on_worker(worker: Any, in_flight: InFlightBatch) -> list[ImageResult]:
    """The worker call of a batch: one answer; or, when any of its jobs streams, the
    partial images as the worker makes them (each handed to its ticket), then the answer.
    ``in_flight.response`` holds the call, for preemption to cancel."""
    jobs = in_flight.jobs()
    if not any(job.partial_images for job in jobs):
        in_flight.response = worker.generate.remote(jobs)
        return list(await in_flight.response)
    in_flight.response = worker.options(stream=True).generate_streaming.remote(jobs)
    results: list[ImageResult] | None = None
    async for item in in_flight.response:
        if isinstance(item, PartialImage):
            in_flight.tickets[item.job_index].send_partial(item)
        else:
            results = item
    if results is None:
        raise GenerationFailed("the worker's stream ended without the batch's images")
    return results


async def streamed_answer(
    ticket: Ticket[ImageJob], left: Callable[[Ticket[ImageJob]], None]
) -> AsyncGenerator[StreamQueued | PartialImage | ImageResult, None]:
    """What a streamed job's submitter receives: that it was queued, its partial images
    as they come, and its result (or its failure, raised). ``left`` is told if the
    submitter goes away first."""
    assert ticket.future is not None and ticket.partials is not None
    try:
        yield StreamQueued(estimated_wait_s=ticket.estimated_wait_s)
        async for partial in items_until(ticket.future, ticket.partials):
            yield partial
        yield ticket.future.result()
    except (asyncio.CancelledError, GeneratorExit):
        left(ticket)
        raise


class RecentIds:
    """Ids seen in the last ``keep_s`` seconds (at most ``limit`` of them), oldest first."""

    def __init__(self, keep_s: float = 900.0, limit: int = 200_000) -> None:
        self._seen: dict[str, float] = {}
        self._keep_s = keep_s
        self._limit = limit

    def seen(self, key: str, now: float) -> bool:
        """Whether ``key`` was added within the last ``keep_s`` seconds (an entry past its
        age counts as gone even before the next ``add`` drops it)."""
        added = self._seen.get(key)
        return added is not None and added >= now - self._keep_s

    def add(self, key: str, now: float) -> None:
        self._seen.setdefault(key, now)
        while self._seen:
            oldest = next(iter(self._seen))
            if len(self._seen) <= self._limit and self._seen[oldest] >= now - self._keep_s:
                break
            del self._seen[oldest]


def with_scheduler_timings(
    result: ImageResult, ticket: Ticket[ImageJob], in_flight: InFlightBatch, round_trip_ms: float
) -> ImageResult:
    """``result`` with the scheduler's stages added: its queue wait, and the round trip
    to the worker less what the worker reported (``mediagate.protocol.timing``)."""
    worker_ms = result.timings_ms.get("pipeline", 0.0)
    timings = {
        **result.timings_ms,
        "queue": max(0.0, (in_flight.started_at - ticket.enqueued_at) * 1000),
        "dispatch": max(0.0, round_trip_ms - worker_ms),
    }
    return result.model_copy(update={"timings_ms": timings})
