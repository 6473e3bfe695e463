"""One queue schema for every scheduler (``QueueStats``): GET /v1/status shows a video
model's admissions and wait estimates as it shows an image model's."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from deployments.scheduler.images import Scheduler
from mediagate.protocol.scheduling import QueueStats
from tests.fakes import FakeClock, FakeImageWorker, LocalHandle
from tests.unit.test_queue_discipline import SPEC as IMAGE_SPEC
from tests.unit.test_queue_discipline import count_one, job
from tests.unit.test_video_scheduler import Rig
from tests.unit.test_video_tier_terms import VideoService, policy

SCHEMA = {field.name for field in dataclasses.fields(QueueStats)} - {"decision_counts"}


async def test_image_and_video_schedulers_report_the_same_queue_schema(tmp_path: Path) -> None:
    worker = FakeImageWorker()
    image = Scheduler(
        LocalHandle(worker), IMAGE_SPEC, count_replicas=count_one, clock=FakeClock(0.0)
    )
    video = Rig(tmp_path)
    try:
        submitted = asyncio.create_task(image.submit(job("img", max_wait_s=30)))
        await worker.started.wait()
        await video.add("video_a")
        await video.worker.wait_running(1)

        for stats in (image.stats(), video.scheduler.stats()):
            assert set(stats) >= SCHEMA
            assert stats["admitted_class_0"] == 1
            assert stats["running_by_class"] == {0: 1}
            assert QueueStats.from_dict(stats).by_class("admitted") == {0: 1}
        worker.release.set()
        await submitted
    finally:
        await image.shutdown()
        await video.scheduler.shutdown()


async def test_status_shows_a_video_models_admissions_and_wait_estimates(
    tmp_path: Path,
) -> None:
    videos = VideoService(tmp_path, policy())  # plus may wait 120 s, pro 600 s
    try:
        measured = await videos.run_one(videos.plus, seconds=100)
        running = (await videos.create(videos.plus)).json()["id"]
        await videos.worker.wait_running(1)
        queued = (await videos.create(videos.plus)).json()["id"]
        assert (await videos.create(videos.plus)).status_code == 503  # 150 s > 96 s
        pro = (await videos.create(videos.pro)).json()["id"]

        response = await videos.client.get("/v1/status", headers=videos.plus)

        model = response.json()["models"]["tiny-wan"]
        assert model["admitted"] == {"plus": 3, "pro": 1} and model["shed"] == {"plus": 1}
        assert model["queue_by_tier"] == {"plus": 1, "pro": 1}
        assert model["running_by_tier"] == {"plus": 1}
        # Half the running job, then one queued job ahead of a new pro account's, two
        # (pro's and plus's) ahead of a new plus account's.
        assert model["wait_estimate_s_by_tier"] == {"plus": 250.0, "pro": 150.0}
        assert model["wait_beyond_estimate_s_by_tier"] == {"plus": {"p50": 0.0, "p99": 0.0}}
        assert (model["busy_slots"], model["capacity"], model["replicas"]) == (1, 1, 1)
        assert "running" not in model
        for video_id in (measured, running, queued, pro):
            assert video_id not in response.text  # no job ids, of any account
    finally:
        await videos.close()


def test_queue_stats_read_only_the_schema_and_tolerate_an_older_scheduler() -> None:
    older = {"queue_len": 2, "busy_slots": 1, "running": ["video_secret"], "lost": 3}
    read = QueueStats.from_dict(older)
    assert read == QueueStats(queue_len=2, busy_slots=1)
    wire = QueueStats(queue_len=1, decision_counts={"shed_class_2": 4}).as_dict()
    assert wire["shed_class_2"] == 4 and "decision_counts" not in wire
    assert QueueStats.from_dict(wire).by_class("shed") == {2: 4}


def test_a_scheduler_that_fails_shows_as_unavailable_without_its_error(tmp_path: Path) -> None:
    from tests.unit.harness import Service

    service = Service(tmp_path)

    def broken() -> QueueStats:
        raise RuntimeError("internal detail at 0x7f00deadbeef")

    service.video_scheduler.queue_stats = broken  # type: ignore[method-assign]
    status = service.client.get("/v1/status", headers=service.auth)
    assert status.status_code == 200, status.text
    assert status.json()["models"]["tiny-wan"] == {
        "task": "text-to-video",
        "error": "scheduler unavailable",
    }
    assert status.json()["models"]["tiny-sd"]["queue_len"] == 4  # the other one still shows
    assert "0x7f" not in status.text and "RuntimeError" not in status.text
