"""Preemption: the pure decision, the scheduler taking a slot back for pro work, and
the worker stopping a batch at the next denoising step when its call is cancelled."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from deployments.scheduler.preemption import PreemptionPolicy, RunningBatch, batch_to_preempt
from deployments.workers.image_steps import BatchStopped
from deployments.workers.text_to_image import TextToImage, generate_batch
from models.simulated import SimulatedPipeline
from tests.unit.test_queue_discipline import SPEC, job, learn_service_time, one_slot_scheduler

POLICY = PreemptionPolicy(min_remaining_fraction=0.3, max_per_request=1)


def running(batch_id: int, cls: int, started_at: float, **fields: Any) -> RunningBatch:
    values: dict[str, Any] = {
        "batch_id": batch_id,
        "priority_class": cls,
        "started_at": started_at,
        "expected_s": 10.0,
        "preemptions": 0,
    }
    return RunningBatch(**(values | fields))


def test_only_lower_classes_with_enough_work_left_are_preempted() -> None:
    free_early = running(1, 0, started_at=100.0)  # 10% done at t=101
    free_late = running(2, 0, started_at=92.0)  # 90% done: cheaper to wait for it
    plus = running(3, 1, started_at=100.0)
    assert batch_to_preempt([free_late, free_early, plus], 2, now=101.0, policy=POLICY) == (
        free_early
    )
    assert batch_to_preempt([free_late, plus], 2, now=101.0, policy=POLICY) == plus
    assert batch_to_preempt([free_late], 2, now=101.0, policy=POLICY) is None
    # Never for the same or a lower class.
    assert batch_to_preempt([plus], 1, now=101.0, policy=POLICY) is None
    assert batch_to_preempt([free_early], 0, now=101.0, policy=POLICY) is None


def test_preemption_limits() -> None:
    fresh = running(1, 0, started_at=100.0)
    assert batch_to_preempt([fresh], 2, now=100.0, policy=PreemptionPolicy(enabled=False)) is None

    # A request already taken back once runs to the end: it cannot starve.
    def decide(batch: RunningBatch) -> RunningBatch | None:
        return batch_to_preempt([batch], 2, now=100.0, policy=POLICY)

    assert decide(running(1, 0, 100.0, preemptions=1)) is None
    # Unknown length (nothing measured yet) or already stopping: left alone.
    assert decide(running(1, 0, 100.0, expected_s=None)) is None
    assert decide(running(1, 0, 100.0, stopping=True)) is None
    assert decide(running(1, 0, 100.0)) is not None
    with pytest.raises(ValueError, match="min_remaining_fraction"):
        PreemptionPolicy.model_validate({"min_remaining_fraction": 2})


async def test_pro_request_takes_the_slot_of_a_free_batch_that_just_started() -> None:
    worker, clock, scheduler = one_slot_scheduler()
    await learn_service_time(scheduler, worker, clock)
    free = asyncio.create_task(scheduler.submit(job("free", "f", cls=0, max_wait_s=600)))
    other_free = asyncio.create_task(scheduler.submit(job("free2", "g", cls=0, max_wait_s=600)))
    await worker.wait_for_batches(2)
    clock.advance(2)  # 80% of the free batch is still ahead
    pro = asyncio.create_task(scheduler.submit(job("pro", "p", cls=2, max_wait_s=600)))
    await worker.wait_for_batches(3)
    assert worker.stopped == [["free"]]
    assert [b[0].request_id for b in worker.batches] == ["warm", "free", "pro"]
    assert scheduler.stats()["preempted_class_0"] == 1
    assert scheduler.stats()["queue_by_class"] == {0: 2}
    # A second pro request while the preempted free request re-runs: it waits its turn.
    worker.release.set()
    await pro
    worker.release.clear()
    await worker.wait_for_batches(4)
    assert worker.batches[3][0].request_id == "free"  # back first in line
    late_pro = asyncio.create_task(scheduler.submit(job("pro2", "p", cls=2, max_wait_s=600)))
    await asyncio.sleep(0.01)
    assert worker.stopped == [["free"]] and len(worker.batches) == 4
    worker.release.set()
    results = await asyncio.gather(free, late_pro, other_free)
    assert [r.request_id for r in results] == ["free", "pro2", "free2"]
    assert [b[0].request_id for b in worker.batches][4:] == ["pro2", "free2"]
    await scheduler.shutdown()


async def test_a_preempted_request_is_not_expired_by_its_queue_deadline() -> None:
    """It started in time; the deadline bounds the wait before a first start, so a
    request taken back near its deadline runs again rather than fail after running."""
    worker, clock, scheduler = one_slot_scheduler()
    await learn_service_time(scheduler, worker, clock)
    free = asyncio.create_task(scheduler.submit(job("free", "f", cls=0, max_wait_s=30)))
    await worker.wait_for_batches(2)
    clock.advance(1)
    pro = asyncio.create_task(scheduler.submit(job("pro", "p", cls=2, max_wait_s=600)))
    await worker.wait_for_batches(3)
    assert worker.stopped == [["free"]]
    clock.advance(40)  # the pro request runs long: the free one's queue deadline passes
    worker.release.set()
    await pro
    assert (await free).request_id == "free"
    assert [b[0].request_id for b in worker.batches] == ["warm", "free", "pro", "free"]
    assert "expired_class_0" not in scheduler.stats()
    await scheduler.shutdown()


async def test_nearly_finished_batches_and_disabled_policy_are_waited_for() -> None:
    worker, clock, scheduler = one_slot_scheduler(preemption={"enabled": False})
    await learn_service_time(scheduler, worker, clock)
    free = asyncio.create_task(scheduler.submit(job("free", "f", cls=0, max_wait_s=600)))
    await worker.wait_for_batches(2)
    pro = asyncio.create_task(scheduler.submit(job("pro", "p", cls=2, max_wait_s=600)))
    await asyncio.sleep(0.01)
    scheduler.reconfigure({"preemption": {"min_remaining_fraction": 0.3}})
    clock.advance(8)  # 20% left: cheaper to wait
    free2 = asyncio.create_task(scheduler.submit(job("free2", "g", cls=0, max_wait_s=600)))
    await asyncio.sleep(0.01)
    assert worker.stopped == [] and len(worker.batches) == 2
    worker.release.set()
    await asyncio.gather(free, pro, free2)
    assert [b[0].request_id for b in worker.batches] == ["warm", "free", "pro", "free2"]
    await scheduler.shutdown()


def test_a_set_stop_ends_the_real_tiny_pipeline_after_one_step(tmp_path: Path) -> None:
    from models.catalog import load_catalog
    from models.loading import load_pipeline

    pipeline = load_pipeline(load_catalog().models["tiny-sd"], cache_dir=tmp_path)
    stop = threading.Event()
    stop.set()
    with pytest.raises(BatchStopped, match="after step 1"):
        generate_batch(pipeline, [job("x", num_inference_steps=50)], stop)
    # Not set: the same call runs through.
    (result,) = generate_batch(pipeline, [job("y", num_inference_steps=2)], threading.Event())
    (image,) = result.images  # raw pixels: the router encodes them
    assert (image.mode, image.width, image.height) == ("RGB", 64, 64)
    assert len(image.pixels) == 64 * 64 * 3


class SteppedSleep:
    """The simulated pipeline's per-step sleep, under the test's control: every step
    waits for a permit (``allow``), and the test can wait until steps have begun."""

    def __init__(self) -> None:
        self.steps_begun = 0
        self._begun = threading.Semaphore(0)
        self._permits = threading.Semaphore(0)

    def __call__(self, seconds: float) -> None:
        self.steps_begun += 1
        self._begun.release()
        assert self._permits.acquire(timeout=60), "the test never let this step finish"

    def allow(self, steps: int) -> None:
        self._permits.release(steps)

    async def wait_begun(self, steps: int) -> None:
        """Until ``steps`` more steps have begun (each then waits for its permit)."""
        for _ in range(steps):
            assert await self.begins_within(60), "no step began"

    async def begins_within(self, timeout_s: float) -> bool:
        """Whether one more step begins within ``timeout_s``."""
        return await asyncio.to_thread(self._begun.acquire, timeout=timeout_s)


def stepped_worker() -> tuple[TextToImage, SteppedSleep]:
    """A worker on the simulated pipeline whose steps, after the warm-up, run only as
    the test allows them: no wall-clock assumptions about a step's length."""
    pipeline = SimulatedPipeline(step_ms=50, sleep=lambda seconds: None)
    worker = TextToImage(SPEC, cache_dir="unused", load=lambda spec, cache_dir: pipeline)
    sleep = SteppedSleep()
    pipeline._sleep = sleep
    return worker, sleep


async def test_cancelling_a_worker_call_stops_the_pipeline_at_the_next_step() -> None:
    worker, sleep = stepped_worker()
    call = asyncio.create_task(worker.generate([job("long", num_inference_steps=40)]))
    sleep.allow(3)
    await sleep.wait_begun(4)  # three steps done, the fourth under way
    call.cancel()
    for _ in range(10):  # the worker takes the cancellation in and sets its stop flag
        await asyncio.sleep(0)
    sleep.allow(40)  # whatever the pipeline asks for from here on
    with pytest.raises(asyncio.CancelledError):
        await call
    # The step under way when the call was cancelled was the last one: 4 of 40.
    assert sleep.steps_begun == 4


async def test_the_next_batch_waits_until_the_stopped_one_has_left_the_pipeline() -> None:
    worker, sleep = stepped_worker()
    calls: list[str] = []  # "enter <prompt>" and "leave <prompt>", as the pipeline sees them
    pipeline = worker.pipeline

    def recording(**kwargs: Any) -> Any:
        name = kwargs["prompt"][0]
        calls.append(f"enter {name}")
        try:
            return pipeline(**kwargs)
        finally:
            calls.append(f"leave {name}")

    worker.pipelines["text-to-image"] = recording
    stopped = asyncio.create_task(
        worker.generate([job("stopped", prompt="stopped", num_inference_steps=40)])
    )
    sleep.allow(1)
    await sleep.wait_begun(2)  # its second step is under way
    stopped.cancel()
    # Sent while the stopped batch still finishes its step. A worker without the lock
    # lets it into the pipeline at once; half a second is its chance to (a correct
    # worker never does, so the bound cannot fail one).
    following = asyncio.create_task(
        worker.generate([job("next", prompt="next", num_inference_steps=4)])
    )
    assert not await sleep.begins_within(0.5)
    assert calls == ["enter stopped"]
    sleep.allow(100)
    (result,) = await following
    assert result.request_id == "next" and stopped.cancelled()
    assert calls == ["enter stopped", "leave stopped", "enter next", "leave next"]
    assert sleep.steps_begun == 2 + 4
