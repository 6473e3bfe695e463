"""Demand refused at admission reaches the autoscaler: the window's arithmetic, the
scheduler's own sheds, and a router's early refusals sent with its load reads."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.scheduler.turned_away import TurnedAwayDemand
from mediagate.protocol.errors import Overloaded
from mediagate.protocol.scheduling import ClassLoad, PublishedLoad
from tests.unit.test_queue_discipline import job, learn_service_time, one_slot_scheduler


def test_refused_slot_time_over_the_window_is_requests_at_once() -> None:
    demand = TurnedAwayDemand(window_s=60)
    for index in range(30):  # 30 accounts refused within the minute, 10 s of slot each
        assert demand.add(f"free-{index}", 0, 10.0, now=index)
    assert demand.add("plus-1", 1, 47.0, now=30)
    assert demand.concurrency_by_class(30) == pytest.approx({0: 300 / 60, 1: 47 / 60})
    # A minute after each refusal it is gone: the window slides, it does not reset.
    assert demand.concurrency_by_class(75) == pytest.approx({0: 14 * 10 / 60, 1: 47 / 60})
    assert demand.concurrency_by_class(91) == {}


def test_an_account_retrying_counts_once_a_window() -> None:
    demand = TurnedAwayDemand(window_s=60)
    assert demand.add("a", 0, 10.0, now=0)
    assert not demand.add("a", 0, 10.0, now=5)  # its retry after Retry-After
    assert demand.add("a", 2, 10.0, now=6)  # the same id in another class is apart
    assert not demand.add("b", 0, 0.0, now=7)  # nothing measured yet: nothing to count
    assert demand.concurrency_by_class(10) == pytest.approx({0: 10 / 60, 2: 10 / 60})
    assert demand.add("a", 0, 10.0, now=61)  # a new window for it
    assert demand.concurrency_by_class(61) == pytest.approx({0: 10 / 60, 2: 10 / 60})


def test_a_router_sends_what_it_counted_once_and_keeps_what_it_could_not_send() -> None:
    router = TurnedAwayDemand()
    router.add("a", 0, 10.0, now=0)
    router.add("b", 0, 10.0, now=1)
    sent = router.take_unsent()
    assert sent == {0: 20.0} and router.take_unsent() == {}
    router.give_back(sent)  # the read failed
    router.add("c", 1, 5.0, now=2)
    assert router.take_unsent() == {0: 20.0, 1: 5.0}
    scheduler = TurnedAwayDemand()
    scheduler.merge({0: 20.0, 1: 5.0}, now=2)
    assert scheduler.concurrency_by_class(3) == pytest.approx({0: 20 / 60, 1: 5 / 60})
    assert scheduler.concurrency_by_class(62.5) == {}


async def test_a_scheduler_reports_what_it_shed_and_what_routers_refused() -> None:
    worker, clock, scheduler = one_slot_scheduler()
    await learn_service_time(scheduler, worker, clock)  # a request holds its slot 10 s
    running = asyncio.create_task(scheduler.submit(job("busy", max_wait_s=32)))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(scheduler.submit(job(f"q{i}", max_wait_s=32))) for i in range(3)]
    await asyncio.sleep(0)
    for account in ("x", "y", "x"):  # x retries: counted once
        with pytest.raises(Overloaded):
            await scheduler.submit(job(f"late-{account}", account, max_wait_s=10))
    stats = scheduler.record_autoscaling_stats()
    assert stats["turned_away_class_0"] == pytest.approx(2 * 10 / 60)
    assert stats["weighted_turned_away"] == pytest.approx(0.5 * 2 * 10 / 60)  # free: half
    assert stats["weighted_queue_len"] == pytest.approx(0.5 * 3)
    scheduler.published_load({2: 30.0})  # a router refused pro work worth 30 slot-seconds
    stats = scheduler.record_autoscaling_stats()
    assert stats["turned_away_class_2"] == pytest.approx(0.5)
    assert stats["weighted_turned_away"] == pytest.approx(0.5 * 2 * 10 / 60 + 0.5)
    worker.release.set()
    await asyncio.gather(running, *queued)
    clock.advance(61)  # a minute on, nothing refused since
    assert scheduler.record_autoscaling_stats()["weighted_turned_away"] == 0.0
    await scheduler.shutdown()


def test_a_routers_early_refusals_reach_the_scheduler_with_its_next_load_read(
    tmp_path: Any,
) -> None:
    from tests.unit.harness import Service

    service = Service(tmp_path, tier="free")
    other = service.other_auth("another-free", "free")
    service.scheduler.load = PublishedLoad(
        busy=1,
        slots=1,
        service_s={(64, 64, 4, 7.5): 12.0},
        classes={0: ClassLoad(queued=150, queued_above=0, share_above=0.0, depths={1: 90})},
    )
    images = service.gateway.images
    asyncio.run(images._read_load("tiny-sd"))  # the router's copy of the load
    body = {"prompt": "a cat", "size": "64x64"}
    assert service.generate(body).status_code == 503
    assert service.generate(body).status_code == 503  # the same account, again
    assert (
        service.client.post("/v1/images/generations", json=body, headers=other).status_code == 503
    )
    assert service.scheduler.jobs == [] and service.scheduler.turned_away == []
    asyncio.run(images._read_load("tiny-sd"))
    assert service.scheduler.turned_away == [{0: 24.0}]  # two accounts, 12 s each
    asyncio.run(images._read_load("tiny-sd"))  # sent once
    assert service.scheduler.turned_away == [{0: 24.0}]
