"""VideoScheduler against a steerable fake worker and a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from deployments.scheduler.settings import VideoSchedulerSettings
from deployments.scheduler.videos import VideoScheduler
from mediagate.stores import VideoJobRecord
from mediagate.stores.sqlite_store import SqliteStateStore
from models.catalog import load_catalog
from tests.fakes import FakeClock, FakeVideoWorker, LocalHandle

SPEC = load_catalog().models["tiny-wan"]
GENERATION = {
    "prompt": "p",
    "width": 64,
    "height": 64,
    "num_frames": 33,
    "fps": 8,
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
    "seed": 1,
}


class Rig:
    def __init__(self, tmp_path: Path, *, replicas: int = 1, **settings: Any) -> None:
        self.store = SqliteStateStore(tmp_path / "state.db")
        self.worker = FakeVideoWorker(self.store)
        self.clock = FakeClock()
        self.replicas = replicas

        async def count() -> int:
            return self.replicas

        self.scheduler = VideoScheduler(
            LocalHandle(self.worker),
            SPEC,
            settings=VideoSchedulerSettings(
                **{"lease_s": 30, "reconcile_s": 3600, "redispatch_delay_s": 0, **settings}
            ),
            count_replicas=count,
            store=self.store,
            capacity_refresh_s=0.01,
            clock=self.clock,
        )

    async def add(self, job_id: str, *, enqueue: bool = True, **fields: Any) -> None:
        values: dict[str, Any] = {
            "id": job_id,
            "account_id": "acct",
            "model": "tiny-wan",
            "status": "queued",
            "prompt": "p",
            "seconds": 4,
            "size": "64x64",
            "created_at": self.clock(),
            "generation": GENERATION,
        }
        record = VideoJobRecord(**(values | fields))
        await self.store.create_job(record)
        self.clock.advance(1)
        if enqueue:
            await self.scheduler.enqueue(record.account_id, job_id, record.priority_class)

    async def job(self, job_id: str) -> VideoJobRecord:
        job = await self.store.get_job("acct", job_id)
        assert job is not None
        return job


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    await rig.scheduler.shutdown()


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 5) -> None:
    async def poll() -> None:
        # The store has no change notification: poll it.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


async def test_one_job_per_slot_in_arrival_order(rig: Rig) -> None:
    for name in ("video_a", "video_b", "video_c"):
        await rig.add(name)
    await rig.worker.wait_running(1)
    assert rig.worker.running() == ["video_a"]
    assert (await rig.job("video_a")).status == "in_progress"
    assert (await rig.job("video_a")).attempt == 1
    assert rig.scheduler.record_autoscaling_stats() == {
        "queue_len": 2.0,
        "inflight": 1.0,
        "inflight_requests": 1.0,
        "queue_len_class_0": 2.0,
        "weighted_queue_len": 1.0,  # free jobs count half by default
        "turned_away_class_0": 0.0,  # none shed
        "weighted_turned_away": 0.0,
        "weighted_inflight_requests": 0.5,  # the running free job weighs half too
    }
    assert rig.scheduler.position("video_c") == 2

    rig.worker.finish("video_a")
    await rig.worker.wait_running(1)
    assert rig.worker.running() == ["video_b"]
    assert (await rig.job("video_a")).status == "completed"


async def test_more_replicas_more_slots(tmp_path: Path) -> None:
    rig = Rig(tmp_path, replicas=2)
    try:
        for name in ("video_a", "video_b", "video_c"):
            await rig.add(name)
        await rig.worker.wait_running(2)
        assert sorted(rig.worker.running()) == ["video_a", "video_b"]
    finally:
        await rig.scheduler.shutdown()


async def test_a_deleted_queued_job_is_never_dispatched(rig: Rig) -> None:
    await rig.add("video_a")
    await rig.add("video_b")
    await rig.add("video_c")
    await rig.worker.wait_running(1)
    await rig.store.delete_job("acct", "video_b")  # as the router deletes: store, then queue
    assert await rig.scheduler.cancel("acct", "video_b")
    await rig.store.delete_job("acct", "video_c")  # deleted while the scheduler was away
    rig.worker.finish("video_a")
    await until(lambda: _idle(rig))
    assert [task.job_id for task in rig.worker.tasks] == ["video_a"]


async def test_a_reconcile_that_read_the_store_before_a_delete_runs_nothing_deleted(
    rig: Rig,
) -> None:
    """The reconcile pass reads the store, then acts: a job deleted (and cancelled) in
    between is put back in the queue from the stale read, but never dispatched."""
    read, deleted = asyncio.Event(), asyncio.Event()
    read_active_jobs = rig.store.active_jobs

    async def stale_read(model: str) -> list[VideoJobRecord]:
        jobs = await read_active_jobs(model)
        read.set()
        await deleted.wait()
        return jobs

    await rig.add("video_a")
    await rig.add("video_b")
    await rig.worker.wait_running(1)
    rig.store.active_jobs = stale_read  # type: ignore[method-assign]
    pass_done = asyncio.create_task(rig.scheduler.reconcile())
    await read.wait()
    await rig.store.delete_job("acct", "video_b")
    assert await rig.scheduler.cancel("acct", "video_b")
    deleted.set()
    await pass_done
    assert rig.scheduler.stats()["queue_len"] == 1  # back from the stale read
    rig.worker.finish("video_a")
    await until(lambda: _idle(rig))
    assert [task.job_id for task in rig.worker.tasks] == ["video_a"]


async def _idle(rig: Rig) -> bool:
    return rig.scheduler.stats()["queue_len"] == 0 and not rig.worker.running()


async def test_a_lost_worker_reruns_the_job_once_then_fails_it(rig: Rig) -> None:
    await rig.add("video_a")
    await rig.worker.wait_running(1)
    rig.worker.die("video_a")
    await rig.worker.wait_running(1)  # dispatched again
    assert (await rig.job("video_a")).attempt == 2
    rig.worker.die("video_a")

    async def failed() -> bool:
        return (await rig.job("video_a")).status == "failed"

    await until(failed)
    job = await rig.job("video_a")
    assert job.error_code == "worker_lost" and job.lease_expires_at is None
    assert job.runs_lost == 2
    assert job.completed_at is not None and job.expires_at is not None
    assert rig.scheduler.counts["lost"] == 2 and rig.scheduler.counts["requeued"] == 1


async def orphan_and_queued(rig: Rig) -> None:
    """What a restarted scheduler finds in the store: a job queued that it never heard
    of, and one in progress on a worker a scheduler before it dispatched to."""
    await rig.add(
        "video_orphan",
        status="in_progress",
        attempt=1,
        worker_started_at=rig.clock(),
        lease_expires_at=rig.clock() + 5,
        enqueue=False,
    )
    await rig.add("video_queued", enqueue=False)
    await rig.add("video_done", status="completed", enqueue=False)
    await rig.scheduler.reconcile()


async def test_a_restarted_scheduler_leaves_the_slot_to_a_job_still_running(rig: Rig) -> None:
    """The orphan's worker renews its lease: the job holds the only slot (a job sent to
    that busy replica would wait there unstarted while its own lease ran out). When it
    ends, the queued job runs."""
    await orphan_and_queued(rig)
    for _ in range(20):
        await asyncio.sleep(0)
    assert rig.worker.running() == [] and rig.scheduler.position("video_queued") == 1
    assert rig.scheduler.stats()["running"] == ["video_orphan"]
    await rig.store.update_job(
        "acct",
        "video_orphan",
        expect_status=("in_progress",),
        expect_attempt=1,
        changes={"status": "completed", "lease_expires_at": None, "completed_at": rig.clock()},
    )
    await rig.scheduler.reconcile()
    await rig.worker.wait_running(1)
    assert rig.worker.running() == ["video_queued"]
    assert rig.scheduler.stats()["running"] == ["video_queued"]


async def test_a_restarted_scheduler_reruns_a_job_whose_worker_died_too(rig: Rig) -> None:
    """The orphan's lease runs out (its worker died with the old scheduler): it goes back
    first in line, ahead of the job queued after it, and runs as a second attempt."""
    await orphan_and_queued(rig)
    rig.clock.advance(10)
    await rig.scheduler.reconcile()
    await rig.worker.wait_running(1)
    assert rig.worker.running() == ["video_orphan"]
    orphan = await rig.job("video_orphan")
    assert orphan.status == "in_progress" and orphan.attempt == 2
    assert rig.scheduler.position("video_queued") == 1


async def test_an_expired_job_out_of_attempts_fails(rig: Rig) -> None:
    await rig.add(
        "video_x",
        status="in_progress",
        attempt=2,
        runs_lost=1,
        worker_started_at=rig.clock() - 10,
        lease_expires_at=rig.clock() - 1,
        enqueue=False,
    )
    await rig.scheduler.reconcile()
    job = await rig.job("video_x")
    assert (job.status, job.error_code, job.runs_lost) == ("failed", "worker_lost", 2)


async def test_a_dispatch_that_reaches_no_worker_costs_no_run(tmp_path: Path) -> None:
    """Serve may route to a replica that just died: retried, not counted as a lost run,
    and failed only after max_dispatches."""
    rig = Rig(tmp_path, max_dispatches=4)
    rig.worker.unreachable = True
    try:
        await rig.add("video_a")

        async def failed() -> bool:
            return (await rig.job("video_a")).status == "failed"

        await until(failed)
        job = await rig.job("video_a")
        assert (job.attempt, job.runs_lost, job.error_code) == (4, 0, "worker_lost")
        assert "no worker took this video up" in (job.error_message or "")
        assert len(rig.worker.tasks) == 4
    finally:
        await rig.scheduler.shutdown()


async def test_a_late_worker_cannot_complete_a_job_taken_back(rig: Rig) -> None:
    """Attempt fencing: once the job is re-queued, the old dispatch's completion is void."""
    await rig.add("video_a")
    await rig.worker.wait_running(1)
    [first_task] = rig.worker.tasks
    await rig.store.update_job(
        "acct", "video_a", expect_status=("in_progress",), changes={"status": "queued"}
    )
    late = await rig.store.update_job(
        "acct",
        "video_a",
        expect_status=("in_progress",),
        expect_attempt=first_task.attempt,
        changes={"status": "completed"},
    )
    assert late is None
    rig.worker.finish("video_a")  # the fake's own fenced write fails the same way
    await until(lambda: _status_is(rig, "video_a", "queued"))


async def _status_is(rig: Rig, job_id: str, status: str) -> bool:
    return (await rig.job(job_id)).status == status


async def test_live_settings(rig: Rig) -> None:
    rig.scheduler.reconfigure({"slots_per_replica": 2, "lease_s": 5})
    assert rig.scheduler.settings.lease_s == 5
    for name in ("video_a", "video_b"):
        await rig.add(name)
    await rig.worker.wait_running(2)
    assert {task.lease_s for task in rig.worker.tasks} == {5}


async def test_a_store_outage_while_claiming_keeps_the_job_queued(tmp_path: Path) -> None:
    from mediagate.stores import StoreUnavailable

    rig = Rig(tmp_path)
    real_get = rig.store.get_job
    failures = {"left": 1}

    async def flaky_get(account_id: str, job_id: str) -> VideoJobRecord | None:
        if failures["left"]:
            failures["left"] -= 1
            raise StoreUnavailable("redis is down")
        return await real_get(account_id, job_id)

    rig.scheduler._store.get_job = flaky_get  # type: ignore[method-assign]
    try:
        await rig.add("video_a")
        await rig.worker.wait_running(1)  # retried after the outage, about a second later
        assert rig.worker.running() == ["video_a"] and failures["left"] == 0
    finally:
        await rig.scheduler.shutdown()


async def test_higher_classes_first_and_accounts_in_turn(rig: Rig) -> None:
    await rig.add("video_running")
    await rig.worker.wait_running(1)
    for name, account, cls in (
        ("video_a1", "free-a", 0),
        ("video_a2", "free-a", 0),
        ("video_a3", "free-a", 0),
        ("video_b1", "free-b", 0),
        ("video_p1", "pro-p", 2),
    ):
        await rig.add(name, account_id=account, priority_class=cls)
    order = ["video_p1", "video_a1", "video_b1", "video_a2", "video_a3"]
    assert [rig.scheduler.position(name) for name in order] == [1, 2, 3, 4, 5]
    assert rig.scheduler.stats()["queue_by_class"] == {0: 4, 2: 1}
    assert rig.scheduler.record_autoscaling_stats()["queue_len_class_2"] == 1.0
    started = ["video_running"]
    for _ in order:
        rig.worker.finish(started[-1])
        await rig.worker.wait_running(1)
        started.append(rig.worker.running()[0])
    assert started[1:] == order


async def test_user_config_overrides_the_applications_video_settings_key_by_key(
    tmp_path: Path,
) -> None:
    """Video settings are declared once (the application's `args.video`); a live
    user_config overrides single keys, and a key taken out of it goes back."""
    rig = Rig(tmp_path, lease_s=5, max_attempts=3)
    rig.scheduler.reconfigure({"queue_weights": {"0": 1.0}})  # a config naming other keys
    assert (rig.scheduler.settings.lease_s, rig.scheduler.settings.max_attempts) == (5, 3)
    rig.scheduler.reconfigure({"lease_s": 9})
    assert (rig.scheduler.settings.lease_s, rig.scheduler.settings.max_attempts) == (9, 3)
    rig.scheduler.reconfigure({})
    assert rig.scheduler.settings.lease_s == 5
    await rig.scheduler.shutdown()
