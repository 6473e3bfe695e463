"""A tier's longest queue wait and queue length apply to video jobs: refused at once
(before anything is reserved or stored) when they would not start in time, failed
(`queue_timeout`, slot given back) when they waited past it anyway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.scheduler.settings import VideoSchedulerSettings
from deployments.scheduler.videos import VideoScheduler
from mediagate.access.tiers import TierPolicy, load_tier_policy
from mediagate.protocol.errors import Overloaded
from mediagate.stores import VideoJobRecord
from models.catalog import load_catalog
from tests.fakes import FakeVideoWorker, LocalHandle, solid_png
from tests.unit.harness import Service
from tests.unit.test_video_scheduler import Rig

SPEC = load_catalog().models["tiny-wan"]


def policy(**plus_terms: Any) -> TierPolicy:
    """The shipped tiers, with room for many video jobs per plus account, and ``plus_terms``."""
    shipped = load_tier_policy()
    plus = shipped.tiers["plus"].model_copy(update={"video_jobs_at_once": 10, **plus_terms})
    return shipped.model_copy(update={"tiers": {**shipped.tiers, "plus": plus}})


async def until(condition: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10) -> None:
    """Wait for a condition of the store or the scheduler (neither notifies: poll)."""

    async def poll() -> None:
        while True:
            value = condition()
            if await value if isinstance(value, Awaitable) else value:
                return
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


async def mark_completed(service: Service, account_id: str, job_id: str) -> None:
    """A queued job finished, as its worker would have left it (for remixes)."""
    await service.jobs.update_job(
        account_id,
        job_id,
        expect_status=("queued",),
        changes={"status": "completed", "artifacts": {"video": "x"}},
    )


class VideoService:
    """The router app with a real VideoScheduler behind it (one slot, the same store and
    clock) and a worker the test steers; requests run on the test's event loop."""

    def __init__(self, tmp_path: Path, tiers: TierPolicy) -> None:
        self.service = service = Service(tmp_path, policy=tiers)
        self.clock = service.clock
        self.worker = FakeVideoWorker(service.jobs)

        async def one_replica() -> int:
            return 1

        self.scheduler = VideoScheduler(
            LocalHandle(self.worker),
            SPEC,
            settings=VideoSchedulerSettings(lease_s=30, reconcile_s=3600, redispatch_delay_s=0),
            count_replicas=one_replica,
            store=service.jobs,
            capacity_refresh_s=0.01,
            clock=self.clock,
        )
        service.gateway.schedulers["tiny-wan"] = LocalHandle(self.scheduler)
        self.plus = service.other_auth("carol", "plus", age_days=30)
        self.pro = service.auth
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=service.client.app), base_url="http://test"
        )

    async def create(self, auth: dict[str, str], **files: Any) -> httpx.Response:
        if files:
            return await self.client.post(
                "/v1/videos", files={"prompt": (None, "x"), **files}, headers=auth
            )
        return await self.client.post("/v1/videos", json={"prompt": "x"}, headers=auth)

    async def job(self, account: str, video_id: str) -> VideoJobRecord:
        record = self.service.accounts.get_account(account)
        assert record is not None
        job = await self.service.jobs.get_job(record.id, video_id)
        assert job is not None
        return job

    async def active_slots(self, account: str) -> int:
        record = self.service.accounts.get_account(account)
        assert record is not None
        return (await self.service.gateway.guard.ledger.usage(record)).video_jobs_active

    async def stored_jobs(self, account: str) -> list[VideoJobRecord]:
        record = self.service.accounts.get_account(account)
        assert record is not None
        jobs, _ = await self.service.jobs.list_jobs(record.id, after=None, limit=100, order="asc")
        return jobs

    async def run_one(self, auth: dict[str, str], seconds: float) -> str:
        """One job that runs alone and takes ``seconds``: the scheduler's service time."""
        video_id = (await self.create(auth)).json()["id"]
        await self.worker.wait_running(1)
        self.clock.advance(seconds)
        done = self.scheduler.counts["completed"] + 1
        self.worker.finish(video_id)
        await until(lambda: self.scheduler.counts["completed"] == done)
        return str(video_id)

    async def close(self) -> None:
        await self.client.aclose()
        await self.scheduler.shutdown()


@pytest.fixture
async def videos(tmp_path: Path) -> AsyncIterator[VideoService]:
    rig = VideoService(tmp_path, policy(max_queued=1))
    yield rig
    await rig.close()


async def test_a_full_class_queue_refuses_before_reserving_or_storing(
    videos: VideoService,
) -> None:
    running = await videos.create(videos.plus)
    await videos.worker.wait_running(1)
    queued = await videos.create(videos.plus)  # the plus class queue now holds max_queued (1)
    assert (running.status_code, queued.status_code) == (200, 200)
    files = {"input_reference": ("r.png", solid_png(16, 16, 1), "image/png")}

    refused = await videos.create(videos.plus, **files)

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "server_overloaded"
    assert "queue for your tier is full" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    stored = {job.id for job in await videos.stored_jobs("carol")}
    assert stored == {running.json()["id"], queued.json()["id"]}
    assert await videos.active_slots("carol") == 2  # no slot held for the refused job
    refs = [p for p in videos.service.artifacts.root.iterdir() if p.name.startswith("ref_")]
    assert refs == []  # its upload was deleted again
    stats = videos.scheduler.stats()
    assert (stats["admitted_class_1"], stats["shed_class_1"]) == (2, 1)
    # Pro's class is not full: it queues.
    assert (await videos.create(videos.pro)).status_code == 200


async def test_a_wait_beyond_the_tiers_limit_is_refused_from_measured_service_time(
    tmp_path: Path,
) -> None:
    videos = VideoService(tmp_path, policy())  # plus waits at most 120 s
    try:
        # Nothing measured yet: admitted however long the queue.
        await videos.run_one(videos.plus, seconds=100)  # measured: 100 s per job
        assert (await videos.create(videos.plus)).status_code == 200  # runs at once
        await videos.worker.wait_running(1)
        second = await videos.create(videos.plus)  # about 50 s: half the running job
        assert second.status_code == 200
        before = len(await videos.stored_jobs("carol"))

        refused = await videos.create(videos.plus)  # 50 + 100 s > 0.8 x 120 s

        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "server_overloaded"
        assert "about 150s" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "54"  # 150 - 96 s
        assert len(await videos.stored_jobs("carol")) == before
        # Pro may wait 600 s: queued, ahead of the plus job (strict priority).
        assert (await videos.create(videos.pro)).status_code == 200
        assert videos.scheduler.stats()["shed_class_1"] == 1
    finally:
        await videos.close()


async def test_a_remix_is_refused_like_a_new_video(tmp_path: Path) -> None:
    service = Service(tmp_path, policy=policy())
    account = service.accounts.ensure_account("alice", "pro")
    alice = account.id
    transport = httpx.ASGITransport(app=service.client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        files: dict[str, tuple[str | None, str | bytes]] = {
            "prompt": (None, "x"),
            "input_reference": ("r.png", solid_png(16, 16, 1)),
        }
        source = (await client.post("/v1/videos", files=files, headers=service.auth)).json()
        await mark_completed(service, alice, source["id"])
        service.video_scheduler.admit_raises = Overloaded("the queue is full", retry_after_s=7)

        remix = await client.post(
            f"/v1/videos/{source['id']}/remix", json={"prompt": "y"}, headers=service.auth
        )

    assert remix.status_code == 503 and remix.headers["retry-after"] == "7"
    assert remix.json()["error"]["code"] == "server_overloaded"
    jobs, _ = await service.jobs.list_jobs(alice, after=None, limit=10, order="asc")
    assert [job.id for job in jobs] == [source["id"]]
    refs = [p for p in service.artifacts.root.iterdir() if p.name.startswith("ref_")]
    assert len(refs) == 1  # the source's; the remix's copy was deleted again
    usage = await service.gateway.guard.ledger.usage(account)
    assert usage.video_jobs_active == 1  # the source's slot only
    # The router asked with the pro tier's terms: class 2, 600 s, no queue limit.
    assert service.video_scheduler.admissions[-1] == (alice, 2, 600.0, None)


async def test_an_unanswered_admission_does_not_block_creation(tmp_path: Path) -> None:
    service = Service(tmp_path, policy=policy())
    service.video_scheduler.admit_raises = ConnectionError("the scheduler is restarting")
    transport = httpx.ASGITransport(app=service.client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/videos", json={"prompt": "x"}, headers=service.auth)
    assert response.status_code == 200, response.text
    assert service.video_scheduler.enqueued[0][1] == response.json()["id"]


async def test_the_tiers_deadline_is_stored_on_the_job(videos: VideoService) -> None:
    created = (await videos.create(videos.plus)).json()
    job = await videos.job("carol", created["id"])
    assert job.queue_deadline_at == job.created_at + 120  # plus: max_queue_wait_s


async def test_a_video_that_waited_past_its_tiers_limit_fails_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    videos = VideoService(tmp_path, policy())  # plus waits at most 120 s
    try:
        running = (await videos.create(videos.pro)).json()["id"]
        await videos.worker.wait_running(1)
        late = (await videos.create(videos.plus)).json()["id"]
        videos.clock.advance(100)
        in_time = (await videos.create(videos.plus)).json()["id"]
        videos.clock.advance(30)
        assert await videos.active_slots("carol") == 2

        videos.worker.finish(running)  # a slot frees 130 s after `late` was accepted
        await videos.worker.wait_running(1)

        assert videos.worker.running() == [in_time]  # `late`, first in line, never ran
        job = await videos.job("carol", late)
        assert (job.status, job.error_code, job.attempt) == ("failed", "queue_timeout", 0)
        assert "longer than your tier allows (120s)" in (job.error_message or "")
        assert await videos.active_slots("carol") == 1  # its slot came back
        shown = await videos.client.get(f"/v1/videos/{late}", headers=videos.plus)
        assert shown.json()["error"]["code"] == "queue_timeout"
        assert videos.scheduler.stats()["expired_class_1"] == 1
    finally:
        await videos.close()


async def test_a_restarted_scheduler_expires_by_the_stored_deadline_only_first_waits(
    tmp_path: Path,
) -> None:
    """What a scheduler finds after a restart: a job past its deadline fails, a job that
    ran once (re-queued after its worker died) and a job stored before deadlines
    existed run, however long they waited."""
    rig = Rig(tmp_path)
    try:
        past = rig.clock() - 1
        await rig.add("video_late", enqueue=False, queue_deadline_at=past)
        await rig.add("video_rerun", enqueue=False, queue_deadline_at=past, attempt=1)
        await rig.add("video_old", enqueue=False)  # no deadline

        await rig.scheduler.reconcile()
        await rig.worker.wait_running(1)

        late = await rig.job("video_late")
        assert (late.status, late.error_code) == ("failed", "queue_timeout")
        assert rig.worker.running() == ["video_rerun"]
        rig.worker.finish("video_rerun")
        await rig.worker.wait_running(1)
        assert rig.worker.running() == ["video_old"]
        stats = rig.scheduler.stats()
        assert (stats["expired_class_0"], stats["admitted_class_0"]) == (1, 2)
    finally:
        await rig.scheduler.shutdown()


async def test_reconcile_takes_an_expired_job_off_the_queue_while_every_slot_is_busy(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    try:
        await rig.add("video_running")
        await rig.worker.wait_running(1)
        await rig.add("video_waiting", queue_deadline_at=rig.clock() + 10)
        assert rig.scheduler.stats()["queue_len"] == 1
        rig.clock.advance(11)

        await rig.scheduler.reconcile()

        assert rig.scheduler.stats()["queue_len"] == 0
        assert rig.scheduler.position("video_waiting") == 0
        assert (await rig.job("video_waiting")).error_code == "queue_timeout"
    finally:
        await rig.scheduler.shutdown()


async def test_admission_before_and_after_a_measured_service_time(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        await rig.add("video_a")
        await rig.worker.wait_running(1)
        for name in ("video_b", "video_c", "video_d"):
            await rig.add(name)
        # Nothing measured: the wait is unknown, so only the queue length limits.
        assert await rig.scheduler.admit("acct", 0, 30, None) is None
        with pytest.raises(Overloaded, match="queue for your tier is full"):
            await rig.scheduler.admit("acct", 0, 30, 3)

        rig.clock.advance(20)
        rig.worker.finish("video_a")  # measured: 23 s (each add steps the clock 1 s)
        await rig.worker.wait_running(1)
        await until(lambda: rig.scheduler.counts["completed"] == 1)

        with pytest.raises(Overloaded, match="would wait about") as shed:
            await rig.scheduler.admit("acct", 0, 30, None)  # 2 queued + half the running
        assert shed.value.retry_after_s is not None and shed.value.retry_after_s >= 1
        assert await rig.scheduler.admit("pro", 2, 600, None) is not None
        assert rig.scheduler.stats()["shed_class_0"] == 2
        # The job shed after a measure is demand the autoscaler sees (weighed half: free);
        # the one shed before it (no slot time known) is not counted.
        stats = rig.scheduler.record_autoscaling_stats()
        assert stats["turned_away_class_0"] == pytest.approx(23 / 60)
        assert stats["weighted_turned_away"] == pytest.approx(0.5 * 23 / 60)
    finally:
        await rig.scheduler.shutdown()


async def test_a_worker_deployment_scaled_to_zero_still_admits_work(tmp_path: Path) -> None:
    """With no replica running, waiting work is what brings one up: the estimate counts
    one slot, never none (which would refuse every job and never scale up)."""
    rig = Rig(tmp_path)
    try:
        await rig.add("video_a")
        await rig.worker.wait_running(1)
        rig.clock.advance(10)
        rig.worker.finish("video_a")
        await until(lambda: rig.scheduler.counts["completed"] == 1)
        rig.replicas = 0
        await until(lambda: rig.scheduler.stats()["capacity"] == 0)

        assert await rig.scheduler.admit("acct", 0, 30, None) == 0.0
        assert rig.scheduler.stats()["wait_estimate_s_by_class"] == {0: 0.0}
    finally:
        await rig.scheduler.shutdown()


async def test_a_remix_passes_the_tiers_caps_as_they_are_now(tmp_path: Path) -> None:
    """Moved from pro to plus, an account can neither make a 12 s video directly nor by
    remixing one it made as pro: every path that creates work checks the tier's terms."""
    service = Service(tmp_path, policy=policy())
    alice = service.accounts.ensure_account("alice", "pro").id
    transport = httpx.ASGITransport(app=service.client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        twelve = {"prompt": "x", "seconds": "12"}
        source = (await client.post("/v1/videos", json=twelve, headers=service.auth)).json()
        await mark_completed(service, alice, source["id"])
        service.accounts.set_tier("alice", "plus")
        service.clock.advance(8 * 86400)  # old enough for plus video; the key cache expired
        direct = await client.post("/v1/videos", json=twelve, headers=service.auth)
        remix = await client.post(
            f"/v1/videos/{source['id']}/remix", json={"prompt": "y"}, headers=service.auth
        )
    for refused in (direct, remix):
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "seconds"
        assert "plus tier makes videos of at most 8 seconds" in refused.json()["error"]["message"]
    jobs, _ = await service.jobs.list_jobs(alice, after=None, limit=10, order="asc")
    assert [job.id for job in jobs] == [source["id"]]
    assert len(service.video_scheduler.enqueued) == 1
