"""The step-level engine (deployments/workers/step_engine.py): requests join a running
batch at the next step boundary; a higher class pauses a lower one, which resumes where
it stopped (no step is run twice) and gives the image it gives alone; nothing starves;
cancelled seats leave at the next boundary. On the simulated stepper (sleeps per step)
and, for exactness, the real tiny Stable Diffusion loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from deployments.workers.step_engine import SeatCancelled, StepEngine
from mediagate.protocol.work import ImageJob, RawImage
from models.stepping.simulated import SimulatedStepper
from tests.unit.test_stepping import job, pipeline, stock  # noqa: F401  (fixture)


class GatedSleep:
    """The simulated stepper's sleep: each step, once begun, waits for the test's permit."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.begun = threading.Semaphore(0)

    def __call__(self, seconds: float) -> None:
        self.begun.release()
        assert self.permits.acquire(timeout=30), "the test never allowed this step"

    def next_step_begun(self) -> None:
        assert self.begun.acquire(timeout=30), "no step began"

    def allow(self, steps: int) -> None:
        self.permits.release(steps)

    def steps_done(self, steps: int) -> None:
        """Let ``steps`` steps run, each once it has begun."""
        for _ in range(steps):
            self.next_step_begun()
            self.allow(1)


class RecordingStepper(SimulatedStepper):
    def __init__(self, sleep: GatedSleep) -> None:
        super().__init__(step_ms=1, sleep=sleep)
        self.batches: list[list[str]] = []

    def step(self, states: Any) -> None:
        self.batches.append([state.job.request_id for state in states])
        super().step(states)


def sim_job(name: str, cls: int = 0, steps: int = 5, **fields: Any) -> ImageJob:
    return job(name, priority_class=cls, num_inference_steps=steps, account_id=name, **fields)


def engine_with(
    max_batch_images: int, **options: Any
) -> tuple[StepEngine, RecordingStepper, GatedSleep]:
    sleep = GatedSleep()
    stepper = RecordingStepper(sleep)
    return StepEngine(stepper, max_batch_images=max_batch_images, **options), stepper, sleep


def test_a_request_joins_the_running_batch_at_the_next_step() -> None:
    engine, stepper, sleep = engine_with(max_batch_images=4)
    first = engine.submit(sim_job("first", steps=4))
    sleep.steps_done(2)
    sleep.next_step_begun()  # "first"'s third step is under way
    joiner = engine.submit(sim_job("joiner", steps=3))
    sleep.allow(100)
    assert first.result(timeout=10) and joiner.result(timeout=10)
    assert stepper.batches == [
        ["first"],
        ["first"],
        ["first"],
        ["first", "joiner"],
        ["joiner"],
        ["joiner"],
    ]
    engine.stop()


def test_a_higher_class_pauses_a_lower_one_which_resumes_without_redoing_a_step() -> None:
    engine, stepper, sleep = engine_with(max_batch_images=1)
    free = engine.submit(sim_job("free", cls=0, steps=6))
    sleep.steps_done(2)
    sleep.next_step_begun()  # free's third step is under way when pro comes
    pro = engine.submit(sim_job("pro", cls=2, steps=3))
    sleep.allow(100)
    assert len(pro.result(timeout=10).images) == len(free.result(timeout=10).images) == 1
    order = [batch[0] for batch in stepper.batches]
    # pro's first step is the first boundary after it came; free resumes at its 4th
    assert order == ["free"] * 3 + ["pro"] * 3 + ["free"] * 3
    assert engine.counts["pause_steps"] == 3
    engine.stop()


def test_nothing_starves_a_seat_paused_max_pauses_steps_in_a_row_gets_the_next() -> None:
    """It gets one step, then higher classes go first again: it moves on at least one
    step in every ``max_pauses + 1``, and pro work waits at most one step for it."""
    engine, stepper, sleep = engine_with(max_batch_images=1, max_pauses=2)
    free = engine.submit(sim_job("free", cls=0, steps=4))
    sleep.steps_done(1)
    sleep.next_step_begun()
    pro = engine.submit(sim_job("pro", cls=2, steps=6))
    sleep.allow(100)
    assert free.result(timeout=10) and pro.result(timeout=10)
    order = [batch[0] for batch in stepper.batches]
    assert order == ["free", "free", "pro", "pro", "free", "pro", "pro", "free", "pro", "pro"]
    engine.stop()


def test_a_cancelled_seat_leaves_at_the_next_step() -> None:
    engine, stepper, sleep = engine_with(max_batch_images=2)
    gone = engine.submit(sim_job("gone", steps=50))
    stays = engine.submit(sim_job("stays", steps=3))
    sleep.next_step_begun()
    assert engine.cancel("gone/gone")  # account "gone", request "gone"
    sleep.allow(100)
    with pytest.raises(SeatCancelled):
        gone.result(timeout=10)
    assert stays.result(timeout=10)
    assert [b for b in stepper.batches if "gone" in b] == [["gone", "stays"]]
    assert not engine.cancel("gone/gone")  # forgotten
    engine.stop()


def pixels(images: list[RawImage]) -> list[np.ndarray]:
    return [
        np.frombuffer(raw.pixels, np.uint8).reshape(raw.height, raw.width, 3).astype(int)
        for raw in images
    ]


def test_through_the_engine_the_real_loop_gives_the_stock_images(pipeline: Any) -> None:  # noqa: F811
    from models.stepping.stable_diffusion import StableDiffusionStepper

    engine = StepEngine(StableDiffusionStepper(pipeline), max_batch_images=1)
    low = job("low", priority_class=0, seed=4, num_inference_steps=8)
    high = job("high", priority_class=2, seed=5, num_inference_steps=4, guidance_scale=3.0)
    low_images = engine.submit(low)
    high_images = engine.submit(high)  # pauses "low" wherever it is
    for request, made in ((low, low_images), (high, high_images)):
        for a, b in zip(
            pixels(made.result(timeout=60).images), stock(pipeline, request), strict=True
        ):
            assert np.abs(a - b).max() <= 1
    engine.stop()


async def test_a_step_level_scheduler_keeps_seats_for_the_top_class() -> None:
    """Step-level terms (deployments/app.py): one job per call, no preemption, and
    classes below the top fill at most half the seats, so a pro request always finds
    one and pauses free work at a step instead of queueing behind it."""
    from deployments.model_app import step_level_scheduler_config
    from deployments.scheduler.images import Scheduler
    from mediagate.access.tiers import load_tier_policy
    from mediagate.protocol.catalog import StepLevel
    from tests.fakes import FakeClock, FakeImageWorker, LocalHandle
    from tests.unit.test_queue_discipline import SPEC, count_one
    from tests.unit.test_queue_discipline import job as queued_job

    spec = SPEC.model_copy(update={"stepping": StepLevel(seats_per_replica=4)})
    base = step_level_scheduler_config(spec, load_tier_policy())
    assert base is not None and base["seat_shares"] == {0: 0.5, 1: 0.5}
    worker = FakeImageWorker()
    scheduler = Scheduler(
        LocalHandle(worker),
        spec,
        count_replicas=count_one,
        slots_per_replica=4,
        base_config=base,
        clock=FakeClock(0.0),
    )
    scheduler.reconfigure({})  # a live user_config without these keys keeps them
    assert scheduler.settings.preemption.enabled is False
    frees = [
        asyncio.ensure_future(scheduler.submit(queued_job(f"f{i}", f"acct{i}", cls=0)))
        for i in range(4)
    ]
    await worker.wait_for_batches(2)
    await asyncio.sleep(0.01)
    assert len(worker.batches) == 2  # free holds half the seats; two wait in the queue
    assert all(len(batch) == 1 for batch in worker.batches)  # one job per call: a seat each
    pros = [
        asyncio.ensure_future(scheduler.submit(queued_job(f"p{i}", f"pro{i}", cls=2)))
        for i in range(2)
    ]
    await worker.wait_for_batches(4)
    assert [batch[0].request_id for batch in worker.batches[2:]] == ["p0", "p1"]
    worker.release.set()
    await asyncio.gather(*frees, *pros)
    await scheduler.shutdown()


async def test_a_step_level_slots_turn_is_what_its_steps_cost_not_how_long_it_sat() -> None:
    """A seat's call lasts as long as higher classes pause it; the wait estimates count
    its steps' cost times the seats instead (slots / service time = the replica's
    throughput), and a whole-call worker's round trip as before."""
    from deployments.model_app import step_level_scheduler_config
    from deployments.scheduler.images import Scheduler
    from mediagate.access.tiers import load_tier_policy
    from mediagate.protocol.catalog import StepLevel
    from tests.fakes import FakeClock, FakeImageWorker, LocalHandle
    from tests.unit.test_queue_discipline import SPEC, count_one
    from tests.unit.test_queue_discipline import job as queued_job

    spec = SPEC.model_copy(update={"stepping": StepLevel(seats_per_replica=4)})
    for service_s, expected_s in ((0.05, 0.2), (None, 7.0)):
        worker = FakeImageWorker()
        worker.service_s = service_s
        clock = FakeClock(0.0)
        scheduler = Scheduler(
            LocalHandle(worker),
            spec,
            count_replicas=count_one,
            slots_per_replica=4,
            base_config=step_level_scheduler_config(spec, load_tier_policy()),
            clock=clock,
        )
        scheduler.reconfigure({})
        submitted = asyncio.ensure_future(scheduler.submit(queued_job("f", "acct", cls=0)))
        await worker.wait_for_batches(1)
        clock.advance(7.0)  # paused behind pro work for 7 s
        worker.release.set()
        await submitted
        assert list(scheduler.stats()["service_s"].values()) == [pytest.approx(expected_s)]
        await scheduler.shutdown()


def test_a_seat_kept_out_past_its_tiers_wait_is_shed_not_left_waiting() -> None:
    from mediagate.protocol.errors import Overloaded

    now = [0.0]
    sleep = GatedSleep()
    stepper = RecordingStepper(sleep)
    engine = StepEngine(stepper, max_batch_images=1, clock=lambda: now[0])
    pro = engine.submit(sim_job("pro", cls=2, steps=4))
    sleep.next_step_begun()
    free = engine.submit(sim_job("free", cls=0, steps=2, max_wait_s=30))
    now[0] = 31.0  # pro's steps kept it out past its tier's 30 s
    sleep.allow(100)
    assert pro.result(timeout=10)
    with pytest.raises(Overloaded):
        free.result(timeout=10)
    assert "free" not in {name for batch in stepper.batches for name in batch}
    assert engine.counts["shed_unstarted"] == 1
    engine.stop()


def test_the_first_step_wait_counts_to_the_start_of_that_step_and_paused_seats_show() -> None:
    now = [0.0]
    sleep = GatedSleep()
    stepper = RecordingStepper(sleep)
    engine = StepEngine(stepper, max_batch_images=1, clock=lambda: now[0])
    free = engine.submit(sim_job("free", cls=0, steps=3))
    sleep.next_step_begun()  # free's first step, begun at 0
    now[0] = 1.0
    pro = engine.submit(sim_job("pro", cls=2, steps=2))  # arrives mid-step
    now[0] = 1.5
    sleep.allow(1)  # the step ends at 1.5; pro's first step begins
    sleep.steps_done(1)
    sleep.next_step_begun()  # pro's second step
    snapshot = engine.snapshot(window_s=10)
    assert snapshot.paused == 1 and snapshot.seats == 2  # free sat out the last step
    now[0] = 4.0
    sleep.allow(100)
    assert pro.result(timeout=10).first_step_wait_s == pytest.approx(0.5)
    assert free.result(timeout=10).first_step_wait_s == pytest.approx(0.0)
    after = engine.snapshot(window_s=10)
    assert after.paused == 0 and after.seats == 0
    assert after.steps_per_s == pytest.approx(5 / 4.0)  # 5 steps over the 4 s it has run
    assert after.images_per_step == 1.0
    assert stepper.batches == [["free"], ["pro"], ["pro"], ["free"], ["free"]]
    engine.stop()


def test_the_scheduler_reports_its_workers_step_loops_and_first_step_waits() -> None:
    from deployments.scheduler.step_reports import StepLevelReport
    from mediagate.protocol.work import ImageResult, StepEngineStats

    now = [100.0]
    report = StepLevelReport(wall_clock=lambda: now[0])
    assert report.summary() == {} and report.first_step_waits_s() == {}

    def result(worker: str, at: float, wait_s: float, **engine: Any) -> ImageResult:
        return ImageResult(
            request_id="r",
            images=[],
            batch_images=1,
            inference_s=0.1,
            worker=worker,
            first_step_wait_s=wait_s,
            engine=StepEngineStats(at=at, **engine),
        )

    report.record(result("a", 99.0, 0.01, steps_per_s=10, images_per_step=4, paused=1), 2)
    report.record(result("b", 95.0, 0.5, steps_per_s=20, images_per_step=1, seats=3), 0)
    report.record(result("b", 80.0, 0.7, steps_per_s=99, images_per_step=9, seats=9), 0)  # older
    report.record(result("c", 50.0, 0.9, steps_per_s=50, images_per_step=4, seats=2), 0)
    summary = report.summary()
    # c is stale (no result for 50 s): its steps are not recent, its seats still held
    assert summary["steps_per_s"] == 30
    assert summary["images_per_step"] == pytest.approx((10 * 4 + 20 * 1) / 30, abs=0.01)
    assert summary["seats_held"] == 5 and summary["paused"] == 1
    assert report.first_step_waits_s()[2] == {"p50": 0.01, "p99": 0.01}
    assert report.first_step_waits_s()[0]["p99"] == 0.9
    now[0] = 300.0  # every worker long silent: nothing held is counted
    assert report.summary()["seats_held"] == 0


def test_a_job_reaches_the_worker_with_the_wait_its_tier_still_allows() -> None:
    from deployments.scheduler.in_flight import InFlightBatch
    from deployments.scheduler.queue import Ticket

    tickets = [
        Ticket(job=sim_job("waited", max_wait_s=30), enqueued_at=10.0),
        Ticket(job=sim_job("late", max_wait_s=30), enqueued_at=-40.0),
    ]
    jobs = InFlightBatch(1, tickets, started_at=12.5).jobs()
    assert jobs[0].max_wait_s == pytest.approx(27.5)
    assert jobs[1].max_wait_s == pytest.approx(0.001)  # never negative
    assert tickets[0].job.max_wait_s == 30  # a requeued job starts from its tier's wait


def test_a_held_back_class_lets_the_next_one_dispatch_whatever_min_shares_say() -> None:
    """Free work that min_shares puts first but that fills its seat share must not keep
    pro work from the seats left to it."""
    from deployments.scheduler.queue import FairQueue, Ticket
    from deployments.scheduler.settings import ImageSchedulerSettings

    queue: FairQueue[ImageJob] = FairQueue(min_shares={0: 0.9})
    for name, cls in (("f1", 0), ("p1", 2)):
        queue.push(Ticket(job=sim_job(name, cls=cls), enqueued_at=0.0))
    head = queue.head()
    assert head is not None and head.job.request_id == "f1"  # free is owed its share
    settings = ImageSchedulerSettings(seat_shares={0: 0.5, 1: 0.5})
    assert settings.held_back(busy=1, slots=4) == frozenset()
    queue.held_back = settings.held_back(busy=2, slots=4)
    assert queue.held_back == {0, 1}
    head = queue.head()
    assert head is not None and head.job.request_id == "p1"
    queue.held_back = settings.held_back(busy=4, slots=4)
    assert [t.job.request_id for t in queue.take_batch(1)] == ["p1"]


class HoldingStepper(RecordingStepper):
    """Each seat holds 100 bytes; offloads and reloads are recorded."""

    def __init__(self, sleep: GatedSleep) -> None:
        super().__init__(sleep)
        self.moves: list[tuple[str, str]] = []

    def held_bytes(self, state: Any) -> int:
        return 100

    def offload(self, state: Any) -> None:
        self.moves.append(("off", state.job.request_id))

    def reload(self, state: Any) -> None:
        self.moves.append(("back", state.job.request_id))


def test_idle_seats_beyond_the_device_budget_wait_in_host_memory_and_come_back() -> None:
    sleep = GatedSleep()
    stepper = HoldingStepper(sleep)
    engine = StepEngine(stepper, max_batch_images=1, max_idle_device_bytes=150)
    free = engine.submit(sim_job("free", cls=0, steps=2))
    plus = engine.submit(sim_job("plus", cls=1, steps=2))
    pro = engine.submit(sim_job("pro", cls=2, steps=2))
    sleep.steps_done(1)  # pro's first step: free and plus sat it out, 200 bytes > 150
    sleep.next_step_begun()
    assert stepper.moves == [("off", "free")]  # the last to run again goes first
    assert engine.snapshot().offloaded == 1 and engine.snapshot().offloaded_bytes == 100
    sleep.allow(100)
    for seat in (free, plus, pro):
        assert seat.result(timeout=10)
    assert ("back", "free") in stepper.moves  # back on the device before its step
    assert stepper.batches == [["pro"], ["pro"], ["plus"], ["plus"], ["free"], ["free"]]
    assert engine.counts["offloads"] == 1
    engine.stop()


def test_a_stable_diffusion_request_offloaded_and_back_gives_the_same_image(
    pipeline: Any,  # noqa: F811  (the module fixture)
) -> None:
    from models.stepping.stable_diffusion import StableDiffusionStepper

    stepper = StableDiffusionStepper(pipeline)
    request = sim_job("a", steps=4).model_copy(update={"guidance_scale": 7.5})
    state = stepper.start(request)
    for _ in range(4):
        stepper.offload(state)
        assert state.latents.device.type == "cpu" and state.prompt_embeds.device.type == "cpu"
        stepper.reload(state)
        stepper.step([state])
    made = [np.asarray(image) for image in stepper.finish(state)]
    alone = [np.asarray(image) for image in stepper.finish(_alone(stepper, request))]
    for a, b in zip(made, alone, strict=True):
        assert np.array_equal(a, b)


def _alone(stepper: Any, request: ImageJob) -> Any:
    state = stepper.start(request)
    while not state.done:
        stepper.step([state])
    return state
