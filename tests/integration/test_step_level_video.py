"""Step-level video through the real path (issue 17), on Redis and an S3 endpoint
speaking HTTP (moto): the tiny Wan model served step by step (``stepping`` in the
catalog: the video worker's jobs are seats of a step loop, checkpointed every 5 steps).

- A pro video pauses a running plus video at a step and finishes first; the plus one
  resumes, and its video is the one it makes when nothing pauses it.
- A worker killed mid-video: the job runs again from its last checkpoint, its
  progress never going back by more than the checkpoint interval, and the video is
  the one an unbroken run makes."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import yaml

from mediagate.stores import StateConfig
from mediagate.stores.artifacts import ArtifactConfig, s3_client
from tests.integration.conftest import write_unlimited_tiers

APP = "stepped-video"
STEPS = 50  # 65 frames at 128x128: seconds of denoising on one core here
CHECKPOINT_EVERY = 5
JOB: dict[str, Any] = {
    "seconds": "8",
    "size": "128x128",
    "extra_body": {"seed": 7, "num_inference_steps": STEPS},
}


def _tiers(home: Path) -> Path:
    """No quotas; plus may make videos from a new account (the shipped tiers ask 7 days)."""
    path = write_unlimited_tiers(home)
    tiers = yaml.safe_load(path.read_text())
    tiers["tiers"]["plus"]["video"]["min_account_age_days"] = 0
    path.write_text(yaml.safe_dump(tiers))
    return path


@pytest.fixture(scope="module")
def stepped_video(
    serve_port: int,
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    s3_endpoint: str,
) -> Iterator[dict[str, Any]]:
    from ray import serve

    from deployments.app import AppArgs, build_app
    from mediagate.access.accounts import open_account_store

    home = tmp_path_factory.mktemp("stepped-video")
    catalog = yaml.safe_load(resources.files("models").joinpath("catalog.yaml").read_text())
    catalog["models"]["tiny-wan"]["stepping"] = {
        "seats_per_replica": 2,
        "checkpoint_every_steps": CHECKPOINT_EVERY,
    }
    catalog_path = home / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(catalog))
    bucket = f"stepped-{uuid.uuid4().hex[:8]}"
    s3_client(endpoint_url=s3_endpoint, region="us-east-1").create_bucket(Bucket=bucket)
    state = StateConfig(backend="redis", redis_url=redis_url.rsplit("/", 1)[0] + "/2")
    args = AppArgs(
        home=str(home),
        catalog=str(catalog_path),
        models=["tiny-wan"],
        tiers_file=str(_tiers(home)),
        worker_ray_actor_options={"num_cpus": 1, "num_gpus": 0},
        state=state,
        artifacts=ArtifactConfig(
            backend="s3", s3_bucket=bucket, s3_endpoint_url=s3_endpoint, s3_region="us-east-1"
        ),
        router={"poll_after_ms": 100},
        video={"lease_s": 3, "reconcile_s": 0.5, "max_attempts": 2},
    )
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    accounts = open_account_store(state)
    base_url = f"http://127.0.0.1:{serve_port}/{APP}/v1"
    clients = {
        tier: openai.OpenAI(
            base_url=base_url,
            api_key=accounts.create_key(accounts.ensure_account(f"sv-{tier}", tier).id),
            max_retries=0,
        )
        for tier in ("plus", "pro")
    }
    yield {"clients": clients, "state": state, "bucket": bucket, "endpoint": s3_endpoint}
    serve.delete(APP)


def wait_done(client: openai.OpenAI, video_id: str, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status in ("completed", "failed"):
            return video
        time.sleep(0.05)
    raise AssertionError(f"{video_id} did not finish")


def frames_of(client: openai.OpenAI, video_id: str) -> np.ndarray:
    import av

    data = client.videos.download_content(video_id).read()
    with av.open(io.BytesIO(data), mode="r") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def scheduler_stats() -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("Scheduler-tiny-wan", app_name=APP)
    return dict(handle.stats.remote().result())


def test_a_pro_video_pauses_a_running_plus_video_which_resumes_unchanged(
    stepped_video: dict[str, Any],
) -> None:
    plus, pro = stepped_video["clients"]["plus"], stepped_video["clients"]["pro"]
    running = plus.videos.create(prompt="a slow tide", **JOB)
    deadline = time.monotonic() + 120
    while plus.videos.retrieve(running.id).progress < 10:  # some steps in
        assert time.monotonic() < deadline
        time.sleep(0.05)
    urgent = pro.videos.create(prompt="a quick gull", seconds="4", size="64x64")
    urgent_done = wait_done(pro, urgent.id)
    paused_at = plus.videos.retrieve(running.id)
    assert urgent_done.status == "completed"
    assert paused_at.status == "in_progress", paused_at  # the plus video waited, paused
    from ray import serve

    worker = serve.get_deployment_handle("TextToVideo-tiny-wan", app_name=APP)
    assert worker.engine_stats.remote().result()["pause_steps"] >= 4  # pro's 4 steps
    assert wait_done(plus, running.id).status == "completed"
    paused_frames = frames_of(plus, running.id)

    unpaused = plus.videos.create(prompt="a slow tide", **JOB)
    assert wait_done(plus, unpaused.id).status == "completed"
    assert np.array_equal(paused_frames, frames_of(plus, unpaused.id))


def test_a_killed_worker_resumes_the_video_from_its_last_checkpoint(
    stepped_video: dict[str, Any],
) -> None:
    import ray

    pro = stepped_video["clients"]["pro"]
    before = scheduler_stats()
    job = pro.videos.create(prompt="a storm over the harbour", **JOB)
    deadline = time.monotonic() + 120
    while (progress := pro.videos.retrieve(job.id).progress) < 40:  # > 20 steps done
        assert time.monotonic() < deadline
        time.sleep(0.02)
    [replica] = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if f"{APP}#TextToVideo-tiny-wan" in actor["name"]
    ]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    lowest_after_kill = progress
    deadline = time.monotonic() + 180
    while (video := pro.videos.retrieve(job.id)).status not in ("completed", "failed"):
        lowest_after_kill = min(lowest_after_kill, video.progress)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert video.status == "completed", video.error
    # Progress went back to the last checkpoint at most: one interval, not to 0.
    interval = int(95 * CHECKPOINT_EVERY / STEPS) + 1
    assert lowest_after_kill >= progress - interval - 1, (progress, lowest_after_kill)
    after = scheduler_stats()
    assert after["lost"] > before["lost"] and after["resumed"] > before["resumed"], after
    resumed_frames = frames_of(pro, job.id)

    unbroken = pro.videos.create(prompt="a storm over the harbour", **JOB)
    assert wait_done(pro, unbroken.id).status == "completed"
    assert np.array_equal(resumed_frames, frames_of(pro, unbroken.id))
    # Done: no checkpoint is left in the bucket.
    bucket = s3_client(endpoint_url=stepped_video["endpoint"], region="us-east-1")
    keys = [
        item["Key"]
        for item in bucket.list_objects_v2(Bucket=stepped_video["bucket"]).get("Contents", [])
    ]
    assert not [key for key in keys if "ckp_" in key], keys
