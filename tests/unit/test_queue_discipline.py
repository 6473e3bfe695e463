"""Priority classes, per-account fairness, minimum shares, wait estimates, shedding and
deadlines: the queue and admission decisions as pure functions, plus the scheduler
with a fake clock and worker."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from deployments.scheduler.admission import (
    EstimateCheck,
    admit_or_shed,
    count_forwarded,
    estimate_wait_s,
    shed_on_published_load,
    updated_service_time,
)
from deployments.scheduler.images import Scheduler
from deployments.scheduler.queue import FairQueue, Ticket, tickets_ahead
from mediagate.protocol.errors import Overloaded
from mediagate.protocol.scheduling import ClassLoad, PublishedLoad
from mediagate.protocol.work import ImageJob
from models.catalog import load_catalog
from tests.fakes import FakeClock, FakeImageWorker, LocalHandle
from tests.unit.harness import URL

SPEC = load_catalog().models["tiny-sd"]


def job(name: str, account: str = "a", cls: int = 0, **fields: Any) -> ImageJob:
    values: dict[str, Any] = {
        "request_id": name,
        "prompt": "p",
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
        "guidance_scale": 7.5,
        "num_images_per_prompt": 1,
        "seed": 1,
        "output_format": "png",
        "account_id": account,
        "priority_class": cls,
    }
    return ImageJob(**(values | fields))


def ticket(name: str, account: str = "a", cls: int = 0, **fields: Any) -> Ticket[ImageJob]:
    return Ticket(job=job(name, account, cls, **fields), enqueued_at=0.0, future=asyncio.Future())


def drain(queue: FairQueue[ImageJob], max_images: int = 1) -> list[str]:
    order = []
    while len(queue):
        order += [t.job.request_id for t in queue.take_batch(max_images)]
    return order


async def test_positions_and_depths_kept_as_tickets_move_match_a_walk_of_the_queue() -> None:
    """The queue's counted bookkeeping (depths per class, positions) agrees with walking
    every ticket in dispatch order, through pushes, requeues, batches and departures."""
    rng = random.Random(7)
    queue: FairQueue[ImageJob] = FairQueue()
    queued: list[Ticket[ImageJob]] = []
    for step in range(600):
        action = rng.random()
        if action < 0.55 or not queued:
            made = ticket(f"t{step}", f"acct{rng.randrange(6)}", cls=rng.choice([0, 0, 1, 2]))
            (queue.requeue if rng.random() < 0.1 else queue.push)(made)
            queued.append(made)
        elif action < 0.75:
            for taken in queue.take_batch(rng.choice([1, 2, 4])):
                queued.remove(taken)
        else:
            leaving = queued.pop(rng.randrange(len(queued)))
            assert queue.discard(leaving)
            assert not queue.discard(leaving) and queue.position(leaving) == 0
        walked = [
            t
            for cls in sorted(queue.length_by_class(), reverse=True)
            for t in queue._classes[cls].in_turn()
        ]
        assert len(walked) == len(queue) == len(queued)
        for index, each in enumerate(walked, start=1):
            assert queue.position(each) == index
        for cls in (0, 1, 2):
            in_class = [t for t in walked if t.job.priority_class == cls]
            accounts = Counter(t.job.account_id for t in in_class)
            assert queue.depths(cls) == Counter(accounts.values())


async def test_higher_classes_first_fifo_within_an_account() -> None:
    queue: FairQueue[ImageJob] = FairQueue()
    for item in [
        ticket("f1", cls=0),
        ticket("p1", cls=2),
        ticket("s1", cls=1),
        ticket("p2", cls=2),
    ]:
        queue.push(item)
    assert queue.length_by_class() == {0: 1, 1: 1, 2: 2}
    assert list(queue.length_by_class()) == [0, 1, 2]  # in class order, as they came 0, 2, 1
    assert drain(queue) == ["p1", "p2", "s1", "f1"]


async def test_round_robin_between_accounts_in_a_class() -> None:
    queue: FairQueue[ImageJob] = FairQueue()
    for index in range(5):
        queue.push(ticket(f"flood{index}", account="flooder"))
    queue.push(ticket("single", account="quiet"))
    # The quiet account's one request goes second, not sixth.
    assert drain(queue)[:3] == ["flood0", "single", "flood1"]


async def test_minimum_share_for_a_lower_class() -> None:
    queue: FairQueue[ImageJob] = FairQueue(min_shares={0: 0.25})
    for index in range(40):
        queue.push(ticket(f"pro{index}", cls=2))
    for index in range(40):
        queue.push(ticket(f"free{index}", cls=0))
    first_40 = drain(queue)[:40]
    free_served = sum(name.startswith("free") for name in first_40)
    assert 9 <= free_served <= 11  # about a quarter while it has work
    strict: FairQueue[ImageJob] = FairQueue()
    for index in range(5):
        strict.push(ticket(f"pro{index}", cls=2))
        strict.push(ticket(f"free{index}", cls=0))
    assert drain(strict)[:5] == [f"pro{index}" for index in range(5)]


async def test_batches_take_same_shape_from_the_head_class_in_turn() -> None:
    queue: FairQueue[ImageJob] = FairQueue()
    queue.push(ticket("x1", account="x"))
    queue.push(ticket("x2", account="x"))
    queue.push(ticket("y1", account="y"))
    queue.push(ticket("odd", account="z", width=128))
    queue.push(ticket("pro", account="p", cls=1, width=128))
    assert [t.job.request_id for t in queue.take_batch(4)] == ["pro"]
    assert [t.job.request_id for t in queue.take_batch(4)] == ["x1", "y1", "x2"]
    assert [t.job.request_id for t in queue.take_batch(4)] == ["odd"]


async def test_ahead_of_counts_what_would_go_first() -> None:
    queue: FairQueue[ImageJob] = FairQueue()
    for index in range(3):
        queue.push(ticket(f"pro{index}", account="p", cls=2))
    for index in range(4):
        queue.push(ticket(f"flood{index}", account="f", cls=0))
    queue.push(ticket("other", account="o", cls=0))
    # A new pro account is served in the first round: behind one of p's, not all three.
    assert queue.ahead_of(job("new-pro", "q", cls=2)) == 1
    # A new free account waits behind all pro work plus one ticket per free account.
    assert queue.ahead_of(job("new", "n", cls=0)) == 3 + 1 + 1
    # The flooder's next request waits behind its own four and the other account's one.
    assert queue.ahead_of(job("flood4", "f", cls=0)) == 3 + 4 + 1


def test_wait_estimate_and_shedding() -> None:
    assert estimate_wait_s(ahead=0, busy=0, slots=2, service_s=4) == 0
    assert estimate_wait_s(ahead=0, busy=2, slots=2, service_s=4) == 2
    assert estimate_wait_s(ahead=5, busy=2, slots=2, service_s=4) == 2 + 2 * 4
    # No replica counted for a moment (a lightweight update): estimated as one slot, so
    # requests are not shed wholesale (they were: inf -> 503 for pro work under scale set).
    assert estimate_wait_s(ahead=1, busy=0, slots=0, service_s=4) == 4
    admit_or_shed(
        ahead=50, busy=1, slots=1, service_s=None, max_wait_s=1, queued_in_class=0, max_queued=None
    )
    admitted_wait_s = admit_or_shed(
        ahead=5, busy=1, slots=1, service_s=4, max_wait_s=30, queued_in_class=5, max_queued=None
    )
    assert admitted_wait_s == 2 + 5 * 4  # what the scheduler later checks the real wait against
    with pytest.raises(Overloaded) as shed:
        admit_or_shed(
            ahead=10,
            busy=1,
            slots=1,
            service_s=4,
            max_wait_s=30,
            queued_in_class=10,
            max_queued=None,
        )
    assert shed.value.status == 503 and shed.value.code == "server_overloaded"
    assert shed.value.retry_after_s == pytest.approx(2 + 40 - 0.8 * 30)
    # Near the limit is refused too: a wait estimated at 26 s of 28 could run past it.
    with pytest.raises(Overloaded, match="about 26s, too close to or beyond"):
        admit_or_shed(
            ahead=6, busy=1, slots=1, service_s=4, max_wait_s=28, queued_in_class=6, max_queued=None
        )
    assert admit_or_shed(
        ahead=6, busy=1, slots=1, service_s=4, max_wait_s=33, queued_in_class=6, max_queued=None
    ) == pytest.approx(26)
    with pytest.raises(Overloaded, match="queue for your tier is full"):
        admit_or_shed(
            ahead=0, busy=0, slots=1, service_s=1, max_wait_s=30, queued_in_class=3, max_queued=3
        )
    assert updated_service_time(None, 2.0) == 2.0
    assert updated_service_time(2.0, 4.0) == pytest.approx(2.4)


async def count_one() -> int:
    return 1


def one_slot_scheduler(**config: Any) -> tuple[FakeImageWorker, FakeClock, Scheduler]:
    """A scheduler over one worker slot, one request per batch, on a fake clock at 0;
    ``config`` is more of its user_config."""
    worker = FakeImageWorker()
    clock = FakeClock(0.0)
    scheduler = Scheduler(LocalHandle(worker), SPEC, count_replicas=count_one, clock=clock)
    scheduler.reconfigure({"batching": {"max_batch_size": 1}, **config})
    return worker, clock, scheduler


async def learn_service_time(
    scheduler: Scheduler, worker: FakeImageWorker, clock: FakeClock
) -> None:
    """One request of the shape, taking 10 s: the scheduler then knows its service time
    (the request itself had no estimate: nothing was measured when it came)."""
    first = asyncio.create_task(scheduler.submit(job("warm", max_wait_s=600)))
    await worker.started.wait()
    clock.advance(10)
    worker.release.set()
    await first
    worker.release.clear()


async def test_scheduler_sheds_what_would_wait_too_long_without_touching_a_worker() -> None:
    worker, clock, scheduler = one_slot_scheduler()
    await learn_service_time(scheduler, worker, clock)
    running = asyncio.create_task(scheduler.submit(job("busy", max_wait_s=32)))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(scheduler.submit(job(f"q{i}", max_wait_s=32))) for i in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as shed:  # 5 + 3 x 10 s > 0.8 x 32 s
        await scheduler.submit(job("too-late", max_wait_s=32))
    assert shed.value.retry_after_s is not None and shed.value.retry_after_s >= 1
    pro = asyncio.create_task(scheduler.submit(job("pro", "p", cls=2, max_wait_s=600)))
    await asyncio.sleep(0)
    stats = scheduler.stats()
    assert stats["shed_class_0"] == 1 and stats["admitted_class_2"] == 1
    assert stats["queue_by_class"] == {0: 3, 2: 1}
    worker.release.set()
    done = await asyncio.gather(running, pro, *queued)
    assert [r.request_id for r in done] == ["busy", "pro", "q0", "q1", "q2"]
    # The pro request went next, ahead of the free ones queued before it.
    assert [b[0].request_id for b in worker.batches][2] == "pro"
    await scheduler.shutdown()


async def test_queued_work_past_its_deadline_is_dropped_before_dispatch() -> None:
    worker, clock, scheduler = one_slot_scheduler()
    running = asyncio.create_task(scheduler.submit(job("running", max_wait_s=5)))
    await worker.started.wait()
    waiting = asyncio.create_task(scheduler.submit(job("waiting", max_wait_s=5)))
    await asyncio.sleep(0)
    clock.advance(6)
    worker.release.set()
    await running
    with pytest.raises(Overloaded, match="waited longer"):
        await waiting
    assert [b[0].request_id for b in worker.batches] == ["running"]
    assert scheduler.stats()["expired_class_0"] == 1
    await scheduler.shutdown()


def test_estimate_check_reports_how_far_waits_ran_past_the_estimates() -> None:
    check = EstimateCheck(kept=4)
    check.record(0, estimated_s=None, waited_s=9.0)  # admitted before anything was measured
    assert check.summary() == {}
    for estimated_s, waited_s in [(10, 8), (10, 9), (10, 10), (10, 14)]:
        check.record(0, estimated_s=estimated_s, waited_s=waited_s)
    check.record(2, estimated_s=0.5, waited_s=0.25)
    assert check.summary() == {0: {"p50": 0.0, "p99": 4.0}, 2: {"p50": -0.25, "p99": -0.25}}
    check.record(0, estimated_s=1, waited_s=31)  # only the last `kept` count: (10, 8) is gone
    assert check.summary()[0] == {"p50": 4.0, "p99": 30.0}


async def test_the_scheduler_checks_its_wait_estimates_against_the_real_waits() -> None:
    worker, clock, scheduler = one_slot_scheduler()
    await learn_service_time(scheduler, worker, clock)
    running = asyncio.create_task(scheduler.submit(job("busy", max_wait_s=30)))  # starts at once
    await asyncio.sleep(0)
    queued = asyncio.create_task(scheduler.submit(job("next", max_wait_s=30)))  # estimated 5 s
    late = asyncio.create_task(scheduler.submit(job("late", max_wait_s=20)))  # estimated 15 s
    await asyncio.sleep(0)
    clock.advance(25)  # the running batch overran: "next" waited 25 s, "late" expired
    worker.release.set()
    await asyncio.gather(running, queued)
    with pytest.raises(Overloaded, match="waited longer"):
        await late
    # Overruns: busy 0, next 25 - 5 = 20, late (expired, at 25 s) 25 - 15 = 10.
    assert scheduler.stats()["wait_beyond_estimate_s_by_class"] == {0: {"p50": 10.0, "p99": 20.0}}
    await scheduler.shutdown()


def test_status_shows_queues_per_tier_without_other_accounts_data(tmp_path: Any) -> None:
    from tests.unit.harness import Service

    service = Service(tmp_path)
    response = service.client.get("/v1/status", headers=service.auth)
    assert response.status_code == 200
    body = response.json()
    image = body["models"]["tiny-sd"]
    assert image["queue_by_tier"] == {"free": 3, "pro": 1}
    assert image["wait_estimate_s_by_tier"] == {"free": 12.5, "pro": 0.5}
    assert image["wait_beyond_estimate_s_by_tier"] == {"free": {"p50": -0.5, "p99": 2.0}}
    assert image["shed"] == {"free": 7} and image["admitted"] == {"free": 10, "pro": 3}
    assert image["running_by_tier"] == {"pro": 1}
    video = body["models"]["tiny-wan"]
    assert video["queue_len"] == 2 and "running" not in video  # job ids stay private
    assert "video_secret" not in response.text
    assert service.client.get("/v1/status").status_code == 401


async def test_lower_classes_count_only_the_capacity_left_to_them() -> None:
    queue: FairQueue[ImageJob] = FairQueue()
    for index in range(6):
        queue.push(ticket(f"pro{index}", cls=2))
        queue.push(ticket(f"free{index}", cls=0))
    for _ in range(4):
        queue.take_batch(1)  # strict priority: four pro dispatches
    assert queue.share_above(0) == 1.0 and queue.share_above(2) == 0.0
    # Only a tenth of two slots is left to free work here: its wait is ten times longer.
    assert estimate_wait_s(ahead=2, busy=0, slots=2, service_s=1, share_above=0.0) == 1
    assert estimate_wait_s(ahead=2, busy=0, slots=2, service_s=1, share_above=1.0) == 10


KEY = (64, 64, 4, 7.5)
LOAD = PublishedLoad(
    busy=1,
    slots=1,
    service_s={KEY: 1.0},
    classes={
        0: ClassLoad(
            queued=20,
            queued_above=2,
            share_above=0.0,
            depths={1: 4, 4: 4},
            depth_by_account={f"light{i}": 1 for i in range(4)}
            | {f"heavy{i}": 4 for i in range(4)},
        ),
        2: ClassLoad(
            queued=2, queued_above=0, share_above=0.0, depths={2: 1}, depth_by_account={"p": 2}
        ),
    },
)


def test_shedding_on_published_load_is_the_schedulers_decision() -> None:
    def decide(**fields: Any) -> None:
        values: dict[str, Any] = {
            "priority_class": 0,
            "batch_key": KEY,
            "account_id": "new",
            "max_wait_s": 14.0,
            "max_queued": 200,
            "age_s": 0.1,
            "max_age_s": 2.0,
        }
        shed_on_published_load(LOAD, **(values | fields))

    # A new account: 2 pro + one per free account (8) ahead, plus half the running batch.
    decide()  # 0.5 + 10 x 1 s <= 0.8 x 14 s
    # An account with 4 queued: 5 rounds ahead of it.
    with pytest.raises(Overloaded, match="about 22s") as shed:
        decide(account_id="heavy0")  # 0.5 + (2 + 4 x 1 + 4 x 4) x 1 s
    assert shed.value.retry_after_s == pytest.approx(22.5 - 0.8 * 14)
    # The same answer as the scheduler's own computation.
    assert tickets_ahead(queued_above=2, depths={1: 4, 4: 4}, own_depth=4) == 22
    with pytest.raises(Overloaded, match="queue for your tier is full"):
        decide(max_queued=20)
    decide(priority_class=2, max_wait_s=4)  # pro: 0.5 + 2 ahead
    decide(account_id="heavy0", age_s=3.0)  # stale: the scheduler decides
    decide(account_id="heavy0", priority_class=1)  # class never seen: the scheduler decides
    decide(account_id="heavy0", batch_key=(32, 32, 4, 7.5))  # shape not measured yet


async def test_a_routers_copy_of_the_load_follows_what_it_forwards() -> None:
    """Forwarding moves the account one deeper in the router's copy, exactly as pushing
    the ticket moves it in the scheduler's queue: a flooding account is never counted
    twice (a phantom second account once doubled its estimated wait)."""
    queue: FairQueue[ImageJob] = FairQueue()
    for account, count in (("flooder", 6), ("other", 2)):
        for index in range(count):
            queue.push(ticket(f"{account}{index}", account, cls=0))
    view = ClassLoad(
        queued=8,
        queued_above=0,
        share_above=0.0,
        depths=dict(queue.depths(0)),
        depth_by_account=queue.depth_by_account(0),
    )
    load = PublishedLoad(busy=1, slots=1, service_s={}, classes={0: view})
    for index, account in enumerate(["flooder"] * 20 + ["other", "new", "new"]):
        count_forwarded(load, priority_class=0, account_id=account)
        queue.push(ticket(f"forwarded{index}", account, cls=0))
        assert view.depths == queue.depths(0)
        assert view.depth_by_account == queue.depth_by_account(0)
        assert view.queued == len(queue)
        for probe in ("flooder", "other", "new", "unseen"):
            assert tickets_ahead(
                queued_above=0, depths=view.depths, own_depth=view.depth_of(probe)
            ) == queue.ahead_of(job("probe", probe, 0))
    count_forwarded(load, priority_class=1, account_id="flooder")  # a class not published
    assert set(load.classes) == {0}


def test_router_refuses_early_from_published_load_without_a_reservation(tmp_path: Any) -> None:
    from tests.unit.harness import Service

    service = Service(tmp_path, tier="free")
    pro = service.other_auth("paid", "pro")
    service.scheduler.load = PublishedLoad(
        busy=1,
        slots=1,
        service_s={(64, 64, 4, 7.5): 1.0},
        classes={
            0: ClassLoad(queued=150, queued_above=0, share_above=0.0, depths={1: 90}),
            2: ClassLoad(queued=0, queued_above=0, share_above=0.0, depths={}),
        },
    )

    async def follow_once() -> None:
        """Run the router's follower until it has read the load once."""
        follower = asyncio.create_task(service.gateway.images.follow_load())
        while "tiny-sd" not in service.gateway.images._published_load:
            assert not follower.done(), follower
            await asyncio.sleep(0.01)
        follower.cancel()

    asyncio.run(asyncio.wait_for(follow_once(), 30))
    response = service.generate({"prompt": "a cat", "size": "64x64"})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "server_overloaded"
    assert int(response.headers["retry-after"]) >= 60  # 90.5 s of wait, 30 s allowed
    assert service.scheduler.jobs == []  # no hop to the scheduler
    # The router's own decision time is reported; the bound only catches a value in the
    # wrong unit or an absolute timestamp, not a slow machine.
    assert 0 < float(response.headers["x-mediagate-decision-ms"]) < 10_000
    assert service.gateway.guard.counters.get("admitted_image", 0) == 0  # no reservation
    # Pro fits, and goes to the scheduler.
    paid = service.client.post(URL, json={"prompt": "a cat", "size": "64x64"}, headers=pro)
    assert paid.status_code == 200
    assert len(service.scheduler.jobs) == 1
    status = service.client.get("/v1/status", headers=service.auth).json()
    assert status["shed_by_this_router"] == {"free": 1}
    # A stale view is not used: the scheduler decides.
    service.clock.advance(5)
    assert service.generate({"prompt": "a cat", "size": "64x64"}).status_code == 200


def test_one_stuck_scheduler_does_not_delay_the_others_load(tmp_path: Any) -> None:
    """The router reads every image scheduler's load at once: one that never answers
    (its 2 s timeout) leaves the others' loads fresh."""
    from tests.fakes import FakeScheduler
    from tests.unit.harness import Service

    catalog = load_catalog()
    stuck_spec = catalog.models["tiny-sd"].model_copy(update={"id": "tiny-sd-stuck"})
    # asked first: a router reading one scheduler after the other waits on it
    catalog = catalog.model_copy(update={"models": {stuck_spec.id: stuck_spec, **catalog.models}})
    service = Service(tmp_path, catalog=catalog, load_refresh_s=0.01)

    class StuckScheduler(FakeScheduler):
        async def published_load(  # type: ignore[override]
            self, turned_away: dict[int, float] | None = None
        ) -> PublishedLoad:
            await asyncio.Event().wait()
            raise AssertionError("never answers")

    service.gateway.schedulers = {
        **service.gateway.schedulers,
        stuck_spec.id: LocalHandle(StuckScheduler()),
    }

    async def reads_of_the_healthy_scheduler() -> int:
        reads = 0
        follower = asyncio.create_task(service.gateway.images.follow_load())
        deadline = asyncio.get_running_loop().time() + 1.0  # half the stuck one's timeout
        last = None
        while asyncio.get_running_loop().time() < deadline:
            seen = service.gateway.images._published_load.get("tiny-sd")
            if seen is not None and seen is not last:
                reads, last = reads + 1, seen
            await asyncio.sleep(0.005)
        follower.cancel()
        return reads

    assert asyncio.run(reads_of_the_healthy_scheduler()) >= 1
    assert "tiny-sd-stuck" not in service.gateway.images._published_load


async def test_published_load_reproduces_the_schedulers_queue_position() -> None:
    worker = FakeImageWorker()
    scheduler = Scheduler(LocalHandle(worker), SPEC, count_replicas=count_one, clock=FakeClock(0.0))
    scheduler.reconfigure({"batching": {"max_batch_size": 1}})
    waiting = [
        asyncio.create_task(scheduler.submit(job(f"{account}{i}", account, cls, max_wait_s=600)))
        for account, cls, count in (
            ("acct-a", 0, 5),
            ("acct-b", 0, 2),
            ("acct-c", 0, 1),
            ("acct-p", 2, 3),
        )
        for i in range(count)
    ]
    await worker.wait_for_batches(1)  # one running, the rest queued
    load = scheduler.published_load()
    for account, cls in (("acct-a", 0), ("acct-b", 0), ("new", 0), ("acct-p", 2), ("new", 2)):
        probe = job("probe", account, cls)
        view = load.classes[cls]
        queued = sum(1 for t in scheduler._queue.tickets() if t.job.account_id == account)
        assert view.depth_of(account) == queued
        assert tickets_ahead(
            queued_above=view.queued_above, depths=view.depths, own_depth=queued
        ) == scheduler._queue.ahead_of(probe)
    worker.release.set()
    await asyncio.gather(*waiting)
    await scheduler.shutdown()
