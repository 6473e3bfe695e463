"""Scheduler and queue discipline without Ray: fake worker handle, events instead of sleeps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.scheduler.images import Scheduler
from deployments.scheduler.queue import FairQueue, Ticket
from mediagate.protocol.work import ImageJob, ImageResult
from models.catalog import load_catalog
from tests.fakes import FakeClock, FakeImageWorker, LocalHandle

SPEC = load_catalog().models["tiny-sd"]


def job(request_id: str, *, n: int = 1, width: int = 64, steps: int = 4) -> ImageJob:
    return ImageJob(
        request_id=request_id,
        prompt="p",
        width=width,
        height=64,
        num_inference_steps=steps,
        guidance_scale=7.5,
        num_images_per_prompt=n,
        seed=1,
        output_format="png",
    )


def ticket(request_id: str, **kwargs: Any) -> Ticket[ImageJob]:
    return Ticket(job=job(request_id, **kwargs), enqueued_at=0.0, future=asyncio.Future())


async def test_fifo_batches_same_shape_only_up_to_max_images() -> None:
    queue: FairQueue[ImageJob] = FairQueue()
    for item in [
        ticket("a", n=2),
        ticket("b", width=128),
        ticket("c"),
        ticket("d", n=2),
        ticket("e"),
    ]:
        queue.push(item)
    assert [t.job.request_id for t in queue.take_batch(4)] == ["a", "c", "e"]
    assert [t.job.request_id for t in queue.take_batch(4)] == ["b"]
    assert [t.job.request_id for t in queue.take_batch(4)] == ["d"]
    assert len(queue) == 0


async def test_head_larger_than_batch_is_still_taken_alone() -> None:
    queue: FairQueue[ImageJob] = FairQueue()
    queue.push(ticket("big", n=4))
    queue.push(ticket("small"))
    assert [t.job.request_id for t in queue.take_batch(2)] == ["big"]


async def test_discard_removes_only_queued() -> None:
    queue: FairQueue[ImageJob] = FairQueue()
    first = ticket("a")
    queue.push(first)
    assert queue.discard(first) and not queue.discard(first)


async def count_one() -> int:
    return 1


async def test_dispatches_only_into_free_slots_and_batches_the_rest() -> None:
    worker = FakeImageWorker()
    scheduler = Scheduler(LocalHandle(worker), SPEC, count_replicas=count_one, clock=FakeClock())
    first = asyncio.create_task(scheduler.submit(job("a")))
    await worker.started.wait()
    later = [asyncio.create_task(scheduler.submit(job(name))) for name in "bcdef"]
    await asyncio.sleep(0)
    # One replica with one slot is busy: everything else waits in the queue.
    assert len(worker.batches) == 1
    assert scheduler.record_autoscaling_stats() == {
        "queue_len": 5.0,
        "inflight": 1.0,  # batches
        "inflight_requests": 1.0,
        "queue_len_class_0": 5.0,
        "weighted_queue_len": 2.5,  # free work counts half for the autoscaler by default
        "turned_away_class_0": 0.0,  # nothing shed
        "weighted_turned_away": 0.0,
        "weighted_inflight_requests": 0.5,  # the running free request weighs half too
    }
    scheduler.reconfigure({"queue_weights": {"0": 0.1}})  # an SRE's live change
    assert scheduler.record_autoscaling_stats()["weighted_queue_len"] == pytest.approx(0.5)
    worker.release.set()
    results = await asyncio.gather(first, *later)
    assert [r.request_id for r in results] == list("abcdef")
    # After the first batch, the queue drains in batches of up to four images.
    assert [len(batch) for batch in worker.batches] == [1, 4, 1]
    assert scheduler.record_autoscaling_stats() == {
        "queue_len": 0.0,
        "inflight": 0.0,
        "inflight_requests": 0.0,
        "queue_len_class_0": 0.0,  # emptied, still reported
        "weighted_queue_len": 0.0,
        "turned_away_class_0": 0.0,
        "weighted_turned_away": 0.0,
        "weighted_inflight_requests": 0.0,
    }
    await scheduler.shutdown()


async def test_capacity_follows_running_replicas() -> None:
    replicas = 3
    worker = FakeImageWorker()

    async def count() -> int:
        return replicas

    scheduler = Scheduler(LocalHandle(worker), SPEC, count_replicas=count, capacity_refresh_s=0.01)
    scheduler.reconfigure({"batching": {"max_batch_size": 1}})
    tasks = [asyncio.create_task(scheduler.submit(job(str(i)))) for i in range(5)]
    await worker.wait_for_batches(3)
    for _ in range(10):  # let the dispatcher run: it must not exceed the three slots
        await asyncio.sleep(0)
    assert len(worker.batches) == 3 and scheduler.capacity == 3
    worker.release.set()
    await asyncio.gather(*tasks)
    await scheduler.shutdown()


async def test_caller_that_goes_away_leaves_the_queue() -> None:
    worker = FakeImageWorker()
    scheduler = Scheduler(LocalHandle(worker), SPEC, count_replicas=count_one)
    running = asyncio.create_task(scheduler.submit(job("a")))
    await worker.started.wait()
    abandoned = asyncio.create_task(scheduler.submit(job("b", width=128)))
    await asyncio.sleep(0)
    assert scheduler.stats()["queue_len"] == 1
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    assert scheduler.stats()["queue_len"] == 0
    worker.release.set()
    await running
    assert [[j.request_id for j in batch] for batch in worker.batches] == [["a"]]
    await scheduler.shutdown()


class DyingWorker(FakeImageWorker):
    """Holds each batch until released, then fails it as a broken model does."""

    async def _generate(self, jobs: list[ImageJob]) -> list[ImageResult]:
        await super()._generate(jobs)
        raise RuntimeError("replica died")


async def test_worker_failure_reaches_every_caller_of_the_batch() -> None:
    from mediagate.protocol.errors import GenerationFailed

    worker = DyingWorker()
    scheduler = Scheduler(LocalHandle(worker), SPEC, count_replicas=count_one)
    first = asyncio.create_task(scheduler.submit(job("first")))
    await worker.started.wait()
    # Three callers of three accounts wait while the slot is busy: one batch takes them all.
    callers = [
        asyncio.create_task(scheduler.submit(job(name).model_copy(update={"account_id": name})))
        for name in ("bob", "carol", "dave")
    ]
    await asyncio.sleep(0)
    assert scheduler.stats()["queue_len"] == 3
    worker.release.set()
    # Bounded: a caller that never hears back would otherwise hang the suite.
    outcomes = await asyncio.wait_for(
        asyncio.gather(first, *callers, return_exceptions=True), timeout=30
    )
    assert [[j.request_id for j in batch] for batch in worker.batches] == [
        ["first"],
        ["bob", "carol", "dave"],
    ]
    assert all(isinstance(outcome, GenerationFailed) for outcome in outcomes), outcomes
    await scheduler.shutdown()


class LostWorker(FakeImageWorker):
    """Its first ``deaths`` batches end as a call to a replica that died under them
    does (Ray's ``ActorDiedError``); later ones are served."""

    def __init__(self, deaths: int) -> None:
        super().__init__()
        self.deaths = deaths
        self.release.set()

    async def _generate(self, jobs: list[ImageJob]) -> list[ImageResult]:
        from ray.exceptions import ActorDiedError

        results = await super()._generate(jobs)
        if self.deaths:
            self.deaths -= 1
            raise ActorDiedError()
        return results


async def test_a_batch_whose_worker_died_runs_again_after_a_pause() -> None:
    worker = LostWorker(deaths=1)
    scheduler = Scheduler(LocalHandle(worker), SPEC, count_replicas=count_one)
    scheduler.reconfigure({"batching": {"max_batch_size": 1}, "redispatch_delay_s": 0.05})
    results = await asyncio.wait_for(
        asyncio.gather(*(scheduler.submit(job(name)) for name in ("a", "b"))), timeout=30
    )
    assert [result.request_id for result in results] == ["a", "b"]
    # "a" ran twice: its first run ended with its worker; "b" took the free slot while
    # "a" waited out the pause before it was sent again.
    assert [[j.request_id for j in batch] for batch in worker.batches] == [["a"], ["b"], ["a"]]
    stats = scheduler.stats()
    assert stats["worker_lost"] == 1
    assert not any(key.startswith("preempted") for key in stats)
    await scheduler.shutdown()


async def test_a_request_whose_worker_died_twice_gets_a_503_to_retry() -> None:
    """A request that kills every worker it reaches must not go on killing them."""
    from mediagate.protocol.errors import ModelUnavailable

    worker = LostWorker(deaths=2)
    scheduler = Scheduler(LocalHandle(worker), SPEC, count_replicas=count_one)
    scheduler.reconfigure({"redispatch_delay_s": 0})
    with pytest.raises(ModelUnavailable) as refused:
        await asyncio.wait_for(scheduler.submit(job("a")), timeout=30)
    assert refused.value.status == 503 and refused.value.retry_after_s == 2
    assert len(worker.batches) == 2
    assert (await scheduler.submit(job("b"))).request_id == "b"  # the next one is served
    await scheduler.shutdown()


async def test_batch_wait_holds_a_partial_batch_then_sends_it() -> None:
    worker = FakeImageWorker()
    worker.release.set()
    clock = FakeClock(0.0)  # the hold is decided on the scheduler's clock, not the wall's
    scheduler = Scheduler(LocalHandle(worker), SPEC, count_replicas=count_one, clock=clock)
    scheduler.reconfigure({"batching": {"max_batch_size": 4, "batch_wait_s": 0.2}})
    first = asyncio.create_task(scheduler.submit(job("a")))
    for _ in range(10):  # let the dispatcher run: it must hold the lone request
        await asyncio.sleep(0)
    assert worker.batches == []
    second = asyncio.create_task(scheduler.submit(job("b")))
    for _ in range(10):
        await asyncio.sleep(0)
    assert worker.batches == []  # two of four images: still held
    clock.advance(0.2)  # the wait is over: the next wake-up sends what there is
    await asyncio.wait_for(asyncio.gather(first, second), timeout=30)
    assert [len(batch) for batch in worker.batches] == [2]
    await scheduler.shutdown()
