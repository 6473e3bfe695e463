"""TextToVideo without Ray: the tiny Wan pipeline, a real SQLite store and local files."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import pytest

from deployments.workers.text_to_video import TextToVideo
from mediagate.protocol.errors import StoreUnavailable
from mediagate.protocol.work import VideoGeneration, VideoTask
from mediagate.stores import VideoJobRecord
from mediagate.stores.artifacts import LocalArtifactStore
from mediagate.stores.sqlite_store import SqliteStateStore
from models.catalog import load_catalog
from tests.fakes import solid_png

SPEC = load_catalog().models["tiny-wan"]


class Rig:
    """A real TextToVideo on a SQLite store and local files (``artifacts`` replaces the
    file store); ``dispatch`` stores a job as the scheduler's claim leaves it (in
    progress, attempt 1) and returns that attempt's task."""

    def __init__(
        self,
        tmp_path: Path,
        model_cache: Path,
        *,
        artifacts: LocalArtifactStore | None = None,
        spec: Any = SPEC,
        **options: Any,
    ) -> None:
        self.files = tmp_path / "files"
        self.store = SqliteStateStore(tmp_path / "state.db")
        self.artifacts = artifacts or LocalArtifactStore(self.files, b"k" * 32)
        self.worker = TextToVideo(
            spec,
            cache_dir=str(model_cache),
            store=self.store,
            artifact_store=self.artifacts,
            torch_threads=1,
            **options,
        )

    async def dispatch(
        self, job_id: str, *, lease_s: float = 30, priority_class: int = 0, **generation: Any
    ) -> VideoTask:
        values: dict[str, Any] = {
            "prompt": "a red kite",
            "width": 64,
            "height": 64,
            "num_frames": 33,
            "fps": 8,
            "num_inference_steps": 4,
            "guidance_scale": 5.0,
            "seed": 3,
        }
        gen = VideoGeneration(**(values | generation))
        await self.store.create_job(
            VideoJobRecord(
                id=job_id,
                account_id="acct",
                model="tiny-wan",
                status="in_progress",
                attempt=1,
                prompt=gen.prompt,
                seconds=4,
                size="64x64",
                created_at=time.time(),
                lease_expires_at=time.time() + lease_s,
                generation=gen.model_dump(),
            )
        )
        return VideoTask(
            job_id=job_id,
            account_id="acct",
            attempt=1,
            generation=gen,
            lease_s=lease_s,
            content_ttl_s=600,
            priority_class=priority_class,
        )

    async def job(self, job_id: str) -> VideoJobRecord | None:
        return await self.store.get_job("acct", job_id)


def decode(mp4: bytes) -> list[Any]:
    import av

    with av.open(io.BytesIO(mp4), mode="r") as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


async def test_a_job_becomes_an_mp4_thumbnail_and_spritesheet(
    tmp_path: Path, model_cache: Path
) -> None:
    from PIL import Image

    rig = Rig(tmp_path, model_cache)
    task = await rig.dispatch("video_1", num_frames=17, width=48, height=32)
    outcome = await rig.worker.run(task)
    assert outcome.status == "completed" and outcome.steps_done == 4
    job = await rig.job("video_1")
    assert job is not None and job.status == "completed" and job.progress == 100
    assert job.lease_expires_at is None and job.expires_at == pytest.approx(
        time.time() + 600, abs=5
    )
    frames = decode(rig.artifacts.read(job.artifacts["video"]))
    assert len(frames) == 17 and frames[0].shape == (32, 48, 3)
    thumbnail = Image.open(io.BytesIO(rig.artifacts.read(job.artifacts["thumbnail"])))
    assert (thumbnail.format, thumbnail.size) == ("WEBP", (48, 32))
    sheet = Image.open(io.BytesIO(rig.artifacts.read(job.artifacts["spritesheet"])))
    assert sheet.format == "JPEG" and sheet.size == (48 * 4, 32 * 4)


async def test_same_seed_same_video_and_the_reference_image_conditions_it(
    tmp_path: Path, model_cache: Path
) -> None:
    import numpy as np

    rig = Rig(tmp_path, model_cache)
    videos, files = {}, {}
    red = rig.artifacts.put(solid_png(64, 64, seed=255), "png", "ref")
    for job_id, reference in [("video_a", None), ("video_b", None), ("video_c", red)]:
        task = await rig.dispatch(job_id, num_frames=9, input_reference=reference)
        assert (await rig.worker.run(task)).status == "completed"
        job = await rig.job(job_id)
        assert job is not None
        files[job_id] = rig.artifacts.read(job.artifacts["video"])
        videos[job_id] = np.stack(decode(files[job_id]))
    assert files["video_a"] == files["video_b"]  # the same frames make the same file
    same_seed = np.abs(videos["video_a"].astype(int) - videos["video_b"]).mean()
    with_reference = np.abs(videos["video_a"].astype(int) - videos["video_c"]).mean()
    # Random weights make grey-ish noise, so the reference moves pixels a little, but
    # clearly more than re-running with the same seed does (which moves nothing).
    assert same_seed < 0.1 < 1.0 < with_reference, (same_seed, with_reference)


async def test_progress_is_written_while_denoising(tmp_path: Path, model_cache: Path) -> None:
    rig = Rig(tmp_path, model_cache, progress_interval_s=0.0)
    task = await rig.dispatch("video_1", num_inference_steps=12)
    seen: set[int] = set()

    async def watch() -> None:
        while True:
            job = await rig.job("video_1")
            if job is not None:
                seen.add(job.progress)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    await rig.worker.run(task)
    watcher.cancel()
    assert len({p for p in seen if 0 < p < 100}) >= 2, seen


def hold_progress_write(worker: TextToVideo, number: int) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the worker's ``number``-th progress write wait: returns (reached, go_on).

    The denoising loop waits for each write, so the test acts at a known step.
    """
    reached, go_on = asyncio.Event(), asyncio.Event()
    real_renew = worker.renew
    writes = 0

    async def renew(task: VideoTask, **changes: Any) -> bool:
        nonlocal writes
        if changes.get("progress") is not None:
            writes += 1
            if writes == number:
                reached.set()
                await go_on.wait()
        return await real_renew(task, **changes)

    worker.renew = renew  # type: ignore[method-assign]
    return reached, go_on


async def test_deleting_a_running_job_stops_it_at_the_next_step(
    tmp_path: Path, model_cache: Path
) -> None:
    rig = Rig(tmp_path, model_cache, progress_interval_s=0.0)  # a progress write every step
    task = await rig.dispatch("video_1", num_inference_steps=50, num_frames=97)
    at_step_5, go_on = hold_progress_write(rig.worker, 5)
    run = asyncio.create_task(rig.worker.run(task))
    await asyncio.wait_for(at_step_5.wait(), 60)
    await rig.store.delete_job("acct", "video_1")  # while step 5's write waits
    go_on.set()
    outcome = await asyncio.wait_for(run, 60)
    # That write found the job gone: the loop ended at step 5 of 50.
    assert outcome.status == "cancelled" and outcome.steps_done == 5
    assert list((tmp_path / "files").iterdir()) == []  # nothing stored for a deleted job


async def test_a_taken_back_job_is_not_completed_by_its_old_worker(
    tmp_path: Path, model_cache: Path
) -> None:
    """The scheduler re-queued the job (lease ran out); the old attempt's writes are void."""
    rig = Rig(tmp_path, model_cache, progress_interval_s=0.0)
    task = await rig.dispatch("video_1", num_inference_steps=50, num_frames=97)
    at_step_3, go_on = hold_progress_write(rig.worker, 3)
    run = asyncio.create_task(rig.worker.run(task))
    await asyncio.wait_for(at_step_3.wait(), 60)  # running: its third step's write waits
    await rig.store.update_job(
        "acct", "video_1", expect_status=("in_progress",), changes={"status": "queued"}
    )
    go_on.set()
    outcome = await asyncio.wait_for(run, 60)
    assert outcome.status == "cancelled" and outcome.steps_done == 3
    job = await rig.job("video_1")
    assert job is not None and job.status == "queued" and job.artifacts == {}


async def test_a_pipeline_failure_fails_the_job(tmp_path: Path, model_cache: Path) -> None:
    rig = Rig(tmp_path, model_cache)
    task = await rig.dispatch("video_1", input_reference="ref_" + "0" * 32 + ".png")
    outcome = await rig.worker.run(task)
    assert outcome.status == "failed"
    job = await rig.job("video_1")
    assert job is not None and job.status == "failed" and job.error_code == "generation_failed"
    assert job.completed_at is not None and job.lease_expires_at is None


async def test_a_flagged_video_fails_uncharged_and_leaves_no_files(
    tmp_path: Path, model_cache: Path
) -> None:
    from mediagate.moderation.settings import ModerationSettings

    flags_all = ModerationSettings(image_checker="tests.moderation_checkers:FlagsEverything")
    rig = Rig(tmp_path, model_cache, moderation=flags_all)
    task = await rig.dispatch("video_1", num_frames=9)
    assert (await rig.worker.run(task)).status == "failed"
    job = await rig.job("video_1")
    assert job is not None and job.status == "failed"
    assert job.error_code == "moderation_blocked" and "safety system" in (job.error_message or "")
    assert job.artifacts == {} and not list(rig.files.rglob("vid_*"))


async def test_the_heartbeat_renews_the_lease(tmp_path: Path, model_cache: Path) -> None:
    """With progress writes out of the picture, the lease is still renewed every lease_s / 3."""
    rig = Rig(tmp_path, model_cache, progress_interval_s=3600)
    task = await rig.dispatch("video_1", lease_s=0.15, num_inference_steps=50, num_frames=97)
    leases: set[float] = set()
    run = asyncio.create_task(rig.worker.run(task))
    while not run.done():
        job = await rig.job("video_1")
        if job is not None and job.status == "in_progress" and job.lease_expires_at:
            leases.add(job.lease_expires_at)
        await asyncio.sleep(0.01)
    assert (await run).status == "completed"
    assert len(leases) >= 4, sorted(leases)


async def test_a_job_gone_before_the_worker_starts_is_not_run(
    tmp_path: Path, model_cache: Path
) -> None:
    rig = Rig(tmp_path, model_cache)
    task = await rig.dispatch("video_1")
    await rig.store.delete_job("acct", "video_1")
    outcome = await rig.worker.run(task)
    assert (outcome.status, outcome.steps_done) == ("cancelled", 0)


async def test_the_worker_marks_when_it_took_the_job_up(tmp_path: Path, model_cache: Path) -> None:
    rig = Rig(tmp_path, model_cache)
    task = await rig.dispatch("video_1", num_frames=5)
    assert (await rig.job("video_1")).worker_started_at is None  # type: ignore[union-attr]
    await rig.worker.run(task)
    job = await rig.job("video_1")
    assert job is not None and job.worker_started_at is not None


class FlakyFiles(LocalArtifactStore):
    """Local files whose store goes down after ``good_puts`` writes: the next
    ``failing_puts`` writes fail (all later ones if ``None``), then it is back."""

    def __init__(self, root: Path, *, good_puts: int = 0, failing_puts: int | None) -> None:
        super().__init__(root, b"k" * 32)
        self.good_puts = good_puts
        self.failing_puts = failing_puts
        self.failed_puts = 0

    def put(self, data: bytes, extension: str, kind: Any = "img") -> str:
        down = self.good_puts == 0 and (self.failing_puts is None or self.failing_puts > 0)
        if not down:
            self.good_puts = max(0, self.good_puts - 1)
            return super().put(data, extension, kind)
        self.failed_puts += 1
        if self.failing_puts is not None:
            self.failing_puts -= 1
        raise StoreUnavailable("the file store is unavailable right now")


async def test_a_made_video_waits_for_the_file_store_to_come_back(
    tmp_path: Path, model_cache: Path
) -> None:
    """The store fails three writes in a row: the worker writes again with backoff, and
    the job completes with all three files once the store answers."""
    files = FlakyFiles(tmp_path / "files", failing_puts=3)
    rig = Rig(tmp_path, model_cache, artifacts=files, store_retry_s=30)
    outcome = await rig.worker.run(await rig.dispatch("video_1", num_frames=5))
    assert outcome.status == "completed" and files.failed_puts == 3
    job = await rig.job("video_1")
    assert job is not None and job.status == "completed"
    assert sorted(job.artifacts) == ["spritesheet", "thumbnail", "video"]
    assert all(files.read(artifact) for artifact in job.artifacts.values())


async def test_a_file_store_that_stays_down_fails_the_job_and_leaves_no_files(
    tmp_path: Path, model_cache: Path
) -> None:
    """The video's MP4 is stored, then the store goes down for good: past store_retry_s
    the job fails (``storage_unavailable``) and the MP4 already stored is deleted again."""
    files = FlakyFiles(tmp_path / "files", good_puts=1, failing_puts=None)
    rig = Rig(tmp_path, model_cache, artifacts=files, store_retry_s=1.2)
    outcome = await rig.worker.run(await rig.dispatch("video_1", num_frames=5))
    assert outcome.status == "failed" and files.failed_puts >= 2
    job = await rig.job("video_1")
    assert job is not None and job.status == "failed" and job.artifacts == {}
    assert job.error_code == "storage_unavailable"
    assert "file store" in (job.error_message or "")
    assert [path.name for path in (tmp_path / "files").iterdir()] == []
