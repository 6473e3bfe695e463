"""Video jobs through the real HTTP path, on both backend pairs (SQLite + files, Redis + S3).

The official openai client (3.x, which always sends multipart) creates, polls,
downloads, lists, deletes and remixes; a hand-made JSON body stands in for the
2.x client. Then the failure paths: cancel while running, a worker replica killed
mid-job, and the whole application restarted with jobs queued.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from mediagate.provenance.signing import read_manifest
from tests.integration.conftest import RunningService, deploy_video_app

# A job long enough to catch mid-run: 97 frames at 128x128, 50 steps (about 3.7 s of
# denoising on one core here).
LONG_JOB: dict[str, Any] = {
    "seconds": "12",
    "size": "128x128",
    "extra_body": {"num_inference_steps": 50},
}
DONE = ("completed", "failed")


@pytest.fixture
def client(video_service: RunningService) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{video_service.base_url}/v1", api_key=video_service.key, max_retries=0
    )


def decode_mp4(data: bytes) -> list[Any]:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        assert container.streams.video[0].codec_context.name == "h264"
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def wait_for(
    client: openai.OpenAI, video_id: str, statuses: tuple[str, ...], timeout_s: float = 90
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status in statuses:
            return video
        time.sleep(0.05)
    raise AssertionError(f"{video_id} did not reach {statuses}; last: {video}")


def wait_running(client: openai.OpenAI, video_id: str, timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status == "in_progress" and video.progress > 0:
            return video
        assert video.status in ("queued", "in_progress"), video
        time.sleep(0.02)
    raise AssertionError(f"{video_id} never started")


def wait_progress(client: openai.OpenAI, video_id: str, at_least: int) -> Any:
    """The job once its progress reaches ``at_least`` (it must still be running)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        assert video.status == "in_progress", video
        if video.progress >= at_least:
            return video
        time.sleep(0.02)
    raise AssertionError(f"{video_id} never reached {at_least}%")


def scheduler_stats(service: RunningService) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("Scheduler-tiny-wan", app_name=service.app_name)
    stats: dict[str, Any] = handle.stats.remote().result()
    return stats


def test_create_and_poll_then_download_every_variant(client: openai.OpenAI) -> None:
    # openai types `size` as OpenAI's four sizes; mediagate also serves the tiny model's 64x48.
    video = client.videos.create_and_poll(
        prompt="a paper boat",
        seconds="4",
        size="64x48",  # type: ignore[arg-type]
    )
    assert video.status == "completed" and video.progress == 100, video
    assert (video.seconds, video.size, video.model) == ("4", "64x48", "tiny-wan")
    assert video.completed_at is not None and video.expires_at is not None
    assert video.expires_at > video.completed_at >= video.created_at

    mp4 = client.videos.download_content(video.id).read()
    frames = decode_mp4(mp4)
    assert len(frames) == 33 and frames[0].shape == (48, 64, 3)  # 4 s x 8 fps + 1
    thumbnail_file = client.videos.download_content(video.id, variant="thumbnail").read()
    thumbnail = Image.open(io.BytesIO(thumbnail_file))
    assert thumbnail.format == "WEBP" and thumbnail.size == (64, 48)
    sheet = client.videos.download_content(video.id, variant="spritesheet").read()
    assert Image.open(io.BytesIO(sheet)).format == "JPEG"
    # every variant carries a valid C2PA manifest (the app's local test certificate)
    for data, file_format in ((mp4, "mp4"), (thumbnail_file, "webp"), (sheet, "jpeg")):
        store = read_manifest(data, file_format)
        assert store["validation_state"] == "Valid", store.get("validation_status")
        manifest = store["manifests"][store["active_manifest"]]
        assert manifest["claim_generator_info"][0]["name"] == "mediagate"
        assert "tiny-wan" in json.dumps(manifest["assertions"])


def test_json_create_like_the_2x_client(
    video_service: RunningService, client: openai.OpenAI
) -> None:
    response = httpx.post(
        f"{video_service.base_url}/v1/videos",
        json={"prompt": "a lighthouse", "seconds": "8", "model": "tiny-wan"},
        headers={"Authorization": f"Bearer {video_service.key}"},
    )
    assert response.status_code == 200, response.text
    assert int(response.headers["openai-poll-after-ms"]) == 100
    video = wait_for(client, response.json()["id"], DONE)
    assert video.status == "completed"
    assert len(decode_mp4(client.videos.download_content(video.id).read())) == 65


def test_image_to_video_upload(client: openai.OpenAI) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    video = client.videos.create_and_poll(
        prompt="it moves", input_reference=("start.png", buffer.getvalue(), "image/png")
    )
    assert video.status == "completed", video
    mp4 = client.videos.download_content(video.id).read()
    assert len(decode_mp4(mp4)) == 33
    # made from the client's image: an edit of it, the image its parent ingredient
    store = read_manifest(mp4, "mp4")
    assert store["validation_state"] == "Valid", store.get("validation_status")
    manifest = store["manifests"][store["active_manifest"]]
    assert [i["relationship"] for i in manifest["ingredients"]] == ["parentOf"]
    assert '"c2pa.edited"' in json.dumps(manifest["assertions"])


def test_list_delete_and_remix(client: openai.OpenAI) -> None:
    ids = [client.videos.create(prompt=f"clip {index}").id for index in range(3)]
    for video_id in ids:
        wait_for(client, video_id, DONE)
    first = client.videos.list(limit=2, order="desc")
    listed = [video.id for video in first.data]
    assert len(listed) == 2 and first.has_more
    everything = [video.id for video in client.videos.list(limit=2, order="desc")]  # auto-paging
    assert everything[:2] == listed and set(ids) <= set(everything)
    assert everything.index(ids[2]) < everything.index(ids[0])  # newest first

    deleted = client.videos.delete(ids[0])
    assert deleted.deleted and deleted.id == ids[0] and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(ids[0])

    remix = client.videos.remix(ids[1], prompt="the same clip, at night")
    assert remix.remixed_from_video_id == ids[1] and remix.status in ("queued", "in_progress")
    remixed = wait_for(client, remix.id, DONE)
    assert remixed.status == "completed" and remixed.prompt == "the same clip, at night"


def test_other_accounts_get_404(video_service: RunningService, client: openai.OpenAI) -> None:
    video = client.videos.create_and_poll(prompt="private")
    other = openai.OpenAI(
        base_url=f"{video_service.base_url}/v1", api_key=video_service.other_key, max_retries=0
    )
    with pytest.raises(openai.NotFoundError):
        other.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        other.videos.download_content(video.id)
    with pytest.raises(openai.NotFoundError):
        other.videos.remix(video.id, prompt="mine now")
    with pytest.raises(openai.NotFoundError):
        other.videos.delete(video.id)
    assert video.id not in [v.id for v in other.videos.list()]
    assert client.videos.retrieve(video.id).status == "completed"


def test_cancel_while_running_frees_the_slot(
    video_service: RunningService, client: openai.OpenAI
) -> None:
    long_job = client.videos.create(prompt="a long one", **LONG_JOB)
    running = wait_running(client, long_job.id)
    # The job's own pace, over about five of its progress writes (one each 0.25 s), so
    # that their spacing blurs it little. Denoising ends at 95.
    measured_from, progress_from = time.monotonic(), running.progress
    later = wait_progress(client, long_job.id, progress_from + 30)
    s_per_point = (time.monotonic() - measured_from) / (later.progress - progress_from)
    remaining_s = (95 - later.progress) * s_per_point
    assert later.progress < 60, later  # most of its steps are still ahead
    client.videos.delete(long_job.id)
    cancelled_at = time.monotonic()

    # The worker stops at its next step: the scheduler sees the slot free again...
    while scheduler_stats(video_service)["running"]:
        assert time.monotonic() - cancelled_at < 60, scheduler_stats(video_service)
        time.sleep(0.05)
    stopped_s = time.monotonic() - cancelled_at
    # ...and the next job runs at once, not after the deleted one's remaining steps.
    short = client.videos.create_and_poll(prompt="next in line", poll_interval_ms=50)
    assert short.status == "completed"
    # A worker that ran its remaining steps (and then decoded and encoded) would need at
    # least remaining_s at the pace it had; the machine's load slows both alike.
    assert stopped_s < remaining_s, (stopped_s, remaining_s)


def test_a_killed_worker_loses_no_job(video_service: RunningService, client: openai.OpenAI) -> None:
    import ray

    long_job = client.videos.create(prompt="survive", **LONG_JOB)
    wait_running(client, long_job.id)
    [replica] = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if f"{video_service.app_name}#TextToVideo-tiny-wan" in actor["name"]
    ]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)

    # The scheduler sees the call fail, re-queues the job, and Serve's replacement
    # replica runs it again: a replica start (a minute at most on a busy 2-core machine)
    # plus the job's ~5 s, well inside 120 s. Never reaching an end is the failure.
    final = wait_for(client, long_job.id, DONE, timeout_s=120)
    assert final.status == "completed", (final.error, scheduler_stats(video_service))
    stats = scheduler_stats(video_service)
    assert stats["lost"] >= 1 and stats["requeued"] >= 1 and not stats["running"]
    # The run cut short is counted, and the job ran again as a later attempt.
    [(attempt, runs_lost)] = asyncio.run(_runs(video_service, [long_job.id]))
    assert runs_lost == 1 and attempt >= 2, (attempt, runs_lost)


def test_restarting_the_application_keeps_queued_jobs(
    video_service: RunningService, client: openai.OpenAI
) -> None:
    from ray import serve

    jobs = [client.videos.create(prompt="durable 0", **LONG_JOB).id]
    jobs += [client.videos.create(prompt=f"durable {index}").id for index in (1, 2)]
    wait_running(client, jobs[0])
    serve.delete(video_service.app_name)  # router, scheduler and worker all go away
    assert video_service.state is not None and video_service.artifacts is not None
    deploy_video_app(
        video_service.app_name, video_service.home, video_service.state, video_service.artifacts
    )
    # Serve's graceful shutdown lets the running job finish (or, past its timeout, the lease
    # runs out and it runs again); the queued two are picked up from the store.
    finals = [wait_for(client, job_id, DONE, timeout_s=180) for job_id in jobs]
    assert [video.status for video in finals] == ["completed"] * 3, finals
    runs = asyncio.run(_runs(video_service, jobs))
    # The queued two never lost a run; the running one lost at most the one cut short.
    assert runs[0][1] <= 1 and [lost for _, lost in runs[1:]] == [0, 0], runs


def test_scheduler_and_worker_killed_together(
    video_service: RunningService, client: openai.OpenAI
) -> None:
    """Nobody is left who dispatched the job: the new scheduler finds it in progress in the
    store, waits out the dead worker's lease, and runs it again."""
    import ray

    long_job = client.videos.create(prompt="orphaned", **LONG_JOB)
    wait_running(client, long_job.id)
    app = video_service.app_name
    victims = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if f"{app}#TextToVideo-tiny-wan" in actor["name"]
        or f"{app}#Scheduler-tiny-wan" in actor["name"]
    ]
    assert len(victims) == 2, victims
    for actor in victims:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)

    final = wait_for(client, long_job.id, DONE, timeout_s=120)
    assert final.status == "completed", (final.error, scheduler_stats(video_service))
    # One run was lost; a dispatch that Serve routed to a replica still being replaced
    # may add an attempt that never ran (retried, not counted as lost).
    [(attempt, runs_lost)] = asyncio.run(_runs(video_service, [long_job.id]))
    assert runs_lost == 1 and attempt >= 2, (attempt, runs_lost)


async def _runs(service: RunningService, job_ids: list[str]) -> list[tuple[int, int]]:
    """(attempt, runs_lost) of each job, read from the app's state store."""
    from mediagate.access.accounts import open_account_store
    from mediagate.stores import open_state_store

    assert service.state is not None
    account = open_account_store(service.state).ensure_account("integration", "pro")
    store = open_state_store(service.state)
    try:
        jobs = [await store.get_job(account.id, job_id) for job_id in job_ids]
    finally:
        await store.close()
    return [(job.attempt, job.runs_lost) if job else (-1, -1) for job in jobs]
