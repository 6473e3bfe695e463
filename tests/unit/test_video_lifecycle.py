"""A video job's life across router, a real VideoScheduler and a worker, in one process.

Two guarantees that the per-component tests cannot see: every way a job ends gives its
account's concurrency slot back (the jobs here are created through the router, so they
hold a real reservation), and a worker whose job was taken back and dispatched again
(attempt fencing) writes nothing and keeps no files.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.router.routes import create_api
from deployments.scheduler.settings import VideoSchedulerSettings
from deployments.scheduler.videos import VideoScheduler
from deployments.workers.text_to_video import TextToVideo
from mediagate.protocol.work import VideoOutcome
from mediagate.stores import JobStore, VideoJobRecord
from mediagate.stores.artifacts import ArtifactKind, LocalArtifactStore
from models.catalog import load_catalog
from tests.fakes import FakeVideoWorker, LocalHandle
from tests.unit.harness import Service
from tests.unit.test_text_to_video import Rig

SPEC = load_catalog().models["tiny-wan"]
HOLD_TIMEOUT_S = 60.0  # only reached when a test fails and never opens its gate


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 30) -> None:
    async def poll() -> None:
        # The store has no change notification: poll it.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


class Gate:
    """Holds the first thread that reaches it until the test opens it."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    def hold(self) -> None:
        if self.reached.is_set():
            return
        self.reached.set()
        if not self.opened.wait(HOLD_TIMEOUT_S):
            raise TimeoutError("the test never opened the gate")

    async def wait_reached(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, HOLD_TIMEOUT_S)


class AtStep:
    """The worker's real pipeline, running ``action`` at the end of denoising step
    ``step`` (before the worker's own step callback sees it)."""

    def __init__(self, pipeline: Any, step: int, action: Callable[[], None]) -> None:
        self.pipeline = pipeline
        self.step = step
        self.action = action

    def __call__(self, **kwargs: Any) -> Any:
        reporter = kwargs["callback_on_step_end"]

        def callback(pipe: Any, step: int, timestep: Any, values: dict[str, Any]) -> Any:
            if step == self.step:
                self.action()
            return reporter(pipe, step, timestep, values)

        return self.pipeline(**{**kwargs, "callback_on_step_end": callback})


def out_of_memory() -> None:
    raise RuntimeError("CUDA out of memory")


class HeldArtifacts(LocalArtifactStore):
    """Local files whose first ``put`` waits at ``gate``: the worker is holding an
    encoded video that it has not stored yet."""

    def __init__(self, root: Path, gate: Gate) -> None:
        super().__init__(root, b"k" * 32)
        self.gate = gate

    def put(self, data: bytes, extension: str, kind: ArtifactKind = "img") -> str:
        self.gate.hold()
        return super().put(data, extension, kind)


def real_worker(
    model_cache: Path, store: JobStore, artifacts: LocalArtifactStore, **options: Any
) -> TextToVideo:
    """A real worker on the router harness's stores (Rig brings its own)."""
    return TextToVideo(
        SPEC,
        cache_dir=str(model_cache),
        store=store,
        artifact_store=artifacts,
        torch_threads=1,
        **options,
    )


# -- 1. Every way a job ends gives its concurrency slot back -------------------------------


class Lifecycle:
    """The router app (over HTTP, on this test's event loop) with a real VideoScheduler
    behind it, both on the harness's store; the caller is a plus account, which may run
    one video job at once."""

    def __init__(self, service: Service, worker: Any) -> None:
        self.service = service
        self.worker = worker
        self.replicas = 1

        async def count() -> int:
            return self.replicas

        self.scheduler = VideoScheduler(
            LocalHandle(worker),
            SPEC,
            settings=VideoSchedulerSettings(lease_s=30, reconcile_s=3600, redispatch_delay_s=0),
            count_replicas=count,
            store=service.jobs,
            capacity_refresh_s=0.01,
            clock=service.clock,
        )
        service.gateway.schedulers["tiny-wan"] = LocalHandle(self.scheduler)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_api(service.gateway)),
            base_url="http://mediagate",
        )
        assert service.gateway.policy.tier("plus").video_jobs_at_once == 1
        self.auth = service.other_auth("paula", "plus", age_days=8)  # old enough for video

    async def create(self, prompt: str = "a red kite") -> httpx.Response:
        return await self.client.post(
            "/v1/videos", json={"prompt": prompt, "seconds": "4"}, headers=self.auth
        )

    async def created(self, prompt: str = "a red kite") -> str:
        response = await self.create(prompt)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    async def video(self, video_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/videos/{video_id}", headers=self.auth)
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def until_ended(self, video_id: str, status: str) -> dict[str, Any]:
        """The job once it has ``status`` and its dispatch has unwound: whoever ended it (the
        worker, or the scheduler for a lost worker) writes the status first and settles the
        reservation after, so the status alone would race the next create."""

        async def ended() -> bool:
            running = self.scheduler.stats()["running"]
            return video_id not in running and (await self.video(video_id))["status"] == status

        await until(ended)
        return await self.video(video_id)

    async def set_replicas(self, replicas: int) -> None:
        self.replicas = replicas

        async def seen() -> bool:
            return bool(self.scheduler.stats()["replicas"] == replicas)

        await until(seen)

    async def close(self) -> None:
        await self.scheduler.shutdown()
        await self.client.aclose()


def assert_slot_taken(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "concurrent_jobs_exceeded"


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Lifecycle]:
    service = Service(tmp_path)
    lifecycle = Lifecycle(service, FakeVideoWorker(service.jobs))
    yield lifecycle
    await lifecycle.close()


async def test_a_second_job_is_refused_while_the_first_is_queued_or_running(
    rig: Lifecycle,
) -> None:
    worker: FakeVideoWorker = rig.worker
    await rig.set_replicas(0)  # no worker yet: the job waits in the queue
    first = await rig.created()
    assert (await rig.video(first))["queue_position"] == 1
    assert_slot_taken(await rig.create())

    await rig.set_replicas(1)
    await worker.wait_running(1)
    assert (await rig.video(first))["status"] == "in_progress"
    assert_slot_taken(await rig.create())
    listed = await rig.client.get("/v1/videos", headers=rig.auth)
    assert [video["id"] for video in listed.json()["data"]] == [first]


async def test_a_job_whose_worker_dies_twice_fails_and_frees_its_slot(rig: Lifecycle) -> None:
    worker: FakeVideoWorker = rig.worker
    first = await rig.created()
    await worker.wait_running(1)
    worker.die(first)
    await worker.wait_running(1)  # dispatched again: the first lost run
    assert [task.attempt for task in worker.tasks] == [1, 2]
    assert_slot_taken(await rig.create())  # still this account's running job
    worker.die(first)

    failed = await rig.until_ended(first, "failed")
    assert failed["error"]["code"] == "worker_lost"
    second = await rig.created()  # refused with 429 if the failure kept the slot
    await worker.wait_running(1)
    assert worker.running() == [second]


async def test_a_job_the_worker_completes_frees_its_slot(rig: Lifecycle) -> None:
    worker: FakeVideoWorker = rig.worker
    first = await rig.created()
    await worker.wait_running(1)
    worker.finish(first)
    await rig.until_ended(first, "completed")
    await rig.created()  # refused with 429 if the completion kept the slot


@pytest.mark.parametrize("status", ["queued", "in_progress"])
async def test_deleting_a_job_frees_its_slot(rig: Lifecycle, status: str) -> None:
    worker: FakeVideoWorker = rig.worker
    if status == "queued":
        await rig.set_replicas(0)
    first = await rig.created()
    if status == "in_progress":
        await worker.wait_running(1)
    assert (await rig.video(first))["status"] == status

    deleted = await rig.client.delete(f"/v1/videos/{first}", headers=rig.auth)
    assert deleted.status_code == 200, deleted.text
    await rig.created()  # refused with 429 if the deletion kept the slot


async def test_a_job_that_ends_on_the_worker_frees_its_slot_failed_or_completed(
    tmp_path: Path, model_cache: Path
) -> None:
    """The real worker settles the reservation itself: released when the model fails,
    committed when the video is stored."""
    service = Service(tmp_path)
    worker = real_worker(model_cache, service.jobs, service.artifacts, clock=service.clock)
    pipeline = worker.pipeline
    rig = Lifecycle(service, worker)
    try:
        worker.pipeline = AtStep(pipeline, 1, out_of_memory)
        first = await rig.created()
        failed = await rig.until_ended(first, "failed")
        assert failed["error"]["code"] == "generation_failed"

        worker.pipeline = pipeline
        second = await rig.created()  # refused with 429 if the failure kept the slot
        await rig.until_ended(second, "completed")
        third = await rig.created()  # refused with 429 if the completion kept the slot
        await rig.until_ended(third, "completed")
    finally:
        await rig.close()


# -- 2. Attempt fencing: a job taken back and run again is the new attempt's alone ---------


class WorkerRig(Rig):
    """test_text_to_video's rig, plus what the scheduler does to take a job back."""

    async def take_back_and_run_again(self, job_id: str) -> VideoJobRecord:
        """What the scheduler does once attempt 1's lease has run out: re-queue the job
        (one run lost), then claim it for attempt 2, which is in progress again."""
        requeued = await self.store.update_job(
            "acct",
            job_id,
            expect_status=("in_progress",),
            expect_attempt=1,
            changes={"status": "queued", "progress": 0, "lease_expires_at": None, "runs_lost": 1},
        )
        assert requeued is not None
        now = time.time()
        claimed = await self.store.update_job(
            "acct",
            job_id,
            expect_status=("queued",),
            expect_attempt=1,
            changes={
                "status": "in_progress",
                "attempt": 2,
                "started_at": now,
                "lease_expires_at": now + 30,
                "worker_started_at": None,
                "progress": 0,
            },
        )
        assert claimed is not None
        return claimed

    async def stored(self, job_id: str) -> VideoJobRecord:
        job = await self.job(job_id)
        assert job is not None
        return job

    def video_files(self) -> list[str]:
        return sorted(path.name for path in self.files.iterdir()) if self.files.exists() else []


async def test_an_old_attempt_mid_denoising_writes_nothing_once_the_job_runs_again(
    tmp_path: Path, model_cache: Path
) -> None:
    """Status alone cannot tell the two runs apart here (both are ``in_progress``): only
    the attempt can. The old run stops at its next step, as a deleted job's does."""
    # A write at every step: the old run's next one is refused.
    rig = WorkerRig(tmp_path, model_cache, progress_interval_s=0.0)
    worker = rig.worker
    gate = Gate()
    worker.pipeline = AtStep(worker.pipeline, 1, gate.hold)
    task = await rig.dispatch("video_1")
    run = asyncio.create_task(worker.run(task))
    try:
        await gate.wait_reached()
        before = await rig.stored("video_1")  # attempt 1 was live and writing till now
        assert before.worker_started_at is not None and before.progress > 0
        taken_back = await rig.take_back_and_run_again("video_1")
    finally:
        gate.opened.set()
    outcome = await run

    assert outcome == VideoOutcome(job_id="video_1", status="cancelled", steps_done=2)
    job = await rig.stored("video_1")
    assert job == taken_back  # no progress, lease, completion or artifact of attempt 1
    assert (job.status, job.attempt, job.artifacts) == ("in_progress", 2, {})
    assert rig.video_files() == []


async def test_an_old_attempt_that_encoded_its_video_after_the_take_back_keeps_no_files(
    tmp_path: Path, model_cache: Path
) -> None:
    """Taken back after the last denoising step: the files it stores are deleted again,
    since its completion is refused."""
    gate = Gate()
    rig = WorkerRig(tmp_path, model_cache, artifacts=HeldArtifacts(tmp_path / "files", gate))
    worker = rig.worker
    task = await rig.dispatch("video_1")
    run = asyncio.create_task(worker.run(task))
    try:
        await gate.wait_reached()  # denoised and encoded; storing the MP4 next
        taken_back = await rig.take_back_and_run_again("video_1")
    finally:
        gate.opened.set()
    outcome = await run

    assert outcome.status == "cancelled"
    job = await rig.stored("video_1")
    assert job == taken_back
    assert (job.status, job.attempt, job.artifacts) == ("in_progress", 2, {})
    assert rig.video_files() == []
