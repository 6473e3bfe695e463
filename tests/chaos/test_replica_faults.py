"""Replicas die and the file store goes away under mixed load (issue 15's fault suite),
on the test session's real Ray Serve cluster with Redis state and S3 files
(``cluster_load``):

- every worker replica killed every 10 s while images and videos are asked for;
- the scheduler replicas killed under the same load;
- the file store (moto's S3 server) cut for 30 s.

The short versions run in CI. ``FAULT_LOAD_S=120`` gives the long worker run by hand
(docs/RELIABILITY.md has its figures).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.chaos.cluster_load import (
    ANSWER_TIMEOUT_S,
    FREE_MAX_WAIT_S,
    IMAGE_MODEL,
    VIDEO_MODEL,
    FaultApp,
    ImageAnswer,
    Load,
    decode_frames,
    fault_app,
    kill_replicas,
    scheduler_stats,
    stored_jobs,
    usage_by_account,
)

LOAD_S = float(os.environ.get("FAULT_LOAD_S", "30"))
KILL_EVERY_S = 10.0
STORE_OUTAGE_S = 30.0
WORKER_REPLACEMENT_S = 20.0  # Serve noticing a killed replica and starting a new one
FREE_ACCOUNTS = 12
SCENARIOS = ("workers", "schedulers", "store")
ACCOUNTS = {  # free users of their own per scenario: 3 images a day each
    **{f"free-{tag}-{n}": "free" for tag in SCENARIOS for n in range(FREE_ACCOUNTS)},
    **{f"pro-images-{number}": "pro" for number in range(3)},
    "pro-urls": "pro",
    "pro-probe": "pro",  # the fault task's own requests
    **{f"pro-videos-{number}": "pro" for number in range(2)},
}


@pytest.fixture(scope="module")
def app(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultApp]:
    with fault_app(serve_port, tmp_path_factory.mktemp("faults"), ACCOUNTS) as running:
        yield running


def mixed_callers(load: Load, tag: str, *, url_images: bool = True) -> list[Any]:
    """Pro image callers (paced under their per-minute limit), free users with a few
    tries each, and two video accounts that keep one job each going."""
    callers = [load.image_caller(f"pro-images-{n}", pause_s=1.2) for n in range(3)]
    if url_images:
        callers.append(load.image_caller("pro-urls", pause_s=1.2, fmt="url"))
    callers += [
        load.free_caller(f"free-{tag}-{n}", attempts=6, spread_s=LOAD_S / 6)
        for n in range(FREE_ACCOUNTS)
    ]
    callers += [load.video_caller(f"pro-videos-{n}", f"{tag} {n}") for n in range(2)]
    return callers


async def run_load(app: FaultApp, tag: str, faults: Any, **options: Any) -> Load:
    async with httpx.AsyncClient(
        base_url=app.base_url, timeout=ANSWER_TIMEOUT_S, limits=httpx.Limits(max_connections=100)
    ) as http:
        load = Load(app, http, usage_before=await usage_by_account(app))

        async def stop_after_faults() -> None:
            await faults(load)
            load.stop.set()

        # When a fault step fails, the callers are cancelled with it rather than left
        # running into the next scenario (whose ledger baseline they would move).
        tasks = [
            asyncio.create_task(caller)
            for caller in (stop_after_faults(), *mixed_callers(load, tag, **options))
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return load


def free_bound_s(answer: ImageAnswer, worker_kills: list[float]) -> float:
    """How long a free request may take: its tier's queue wait and a run; if an image
    worker was killed while it was out, also a second run after the replacement replica
    is up (a lost batch runs again once, its queue deadline already met)."""
    bound = FREE_MAX_WAIT_S + 15.0
    if any(answer.sent_at <= kill <= answer.sent_at + answer.took_s for kill in worker_kills):
        bound += WORKER_REPLACEMENT_S
    return bound


async def check_images_and_quota(
    app: FaultApp, load: Load, worker_kills: list[float] | None = None
) -> dict[str, tuple[int, int]]:
    """What every scenario must hold for images: an answer for each request within its
    deadline, only 200 / 429 / 503 (refusals with Retry-After), and the ledger charging
    each account for exactly the images it was given (no free account above 3).
    ``worker_kills`` are the times image workers were killed (``free_bound_s``)."""
    hangs = [answer for answer in load.images if answer.error]
    assert not hangs, hangs[:5]
    statuses = Counter(answer.status for answer in load.images)
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[200] > 0, statuses
    for refused in (answer for answer in load.images if answer.status != 200):
        assert refused.retry_after is not None and float(refused.retry_after) >= 1, refused
    free_late = [
        answer
        for answer in load.images
        if answer.account.startswith("free")
        and answer.took_s > free_bound_s(answer, worker_kills or [])
    ]
    assert not free_late, free_late
    usage = await usage_by_account(app)
    served = Counter(answer.account for answer in load.images if answer.status == 200)
    for account, (images_today, _) in usage.items():
        charged = images_today - load.usage_before[account][0]  # in this scenario
        assert charged == served[account], (account, charged, served[account])
        if account.startswith("free"):
            assert images_today <= 3, (account, images_today)
    server_errors = [status for status in load.other_statuses if status >= 500 and status != 503]
    assert not server_errors, load.other_statuses
    return usage


async def check_videos(app: FaultApp, load: Load, usage: dict[str, tuple[int, int]]) -> list[Any]:
    """Every accepted job ended (the callers followed each to its end), a completed one
    with all its files whole, a failed one for a reason of ours; no reservation left."""
    assert load.video_ids, "no video job was accepted"
    assert {status for status, _ in load.video_refusals} <= {429, 503}, load.video_refusals
    jobs = await stored_jobs(app, load.video_ids)
    for job in jobs:
        assert job.status in ("completed", "failed"), job
        if job.status == "completed":
            files = await load.video_files(load.video_ids[job.id], job.id)
            assert decode_frames(files["video"]) == 65, job.id
            assert files["thumbnail"] and files["spritesheet"], job.id
        else:
            assert job.error_code in ("worker_lost", "storage_unavailable"), job
    for account, (_, video_jobs_held) in usage.items():
        assert video_jobs_held == 0, (account, usage)  # every job's reservation settled
    return jobs


def images_during(load: Load, start: float, end: float) -> list[ImageAnswer]:
    return [answer for answer in load.images if start <= answer.sent_at <= end]


async def video_job_running(deadline_s: float) -> bool:
    """Wait until the video scheduler reports a job running (at most ``deadline_s``)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if (await scheduler_stats(VIDEO_MODEL))["running"]:
            return True
        await asyncio.sleep(0.2)
    return False


async def test_worker_replicas_killed_every_10s_under_mixed_load(app: FaultApp) -> None:
    kills: list[tuple[float, str, int]] = []

    async def faults(load: Load) -> None:
        started = time.monotonic()
        await asyncio.sleep(KILL_EVERY_S / 2)
        while time.monotonic() - started < LOAD_S:
            for deployment in (f"TextToImage-{IMAGE_MODEL}", f"TextToVideo-{VIDEO_MODEL}"):
                if deployment.startswith("TextToVideo"):
                    # A video caller polls between jobs: kill while one runs, so that a
                    # kill is a lost run and not a replica caught idle (CI found one).
                    await video_job_running(deadline_s=KILL_EVERY_S / 2)
                killed = await asyncio.to_thread(kill_replicas, deployment)
                kills.append((time.monotonic(), deployment, killed))
            await asyncio.sleep(KILL_EVERY_S)

    load = await run_load(app, "workers", faults)
    assert sum(killed for _, _, killed in kills) >= 4, kills
    image_kills = [at for at, deployment, _ in kills if deployment.startswith("TextToImage")]
    usage = await check_images_and_quota(app, load, image_kills)
    jobs = await check_videos(app, load, usage)
    image_stats = await scheduler_stats(IMAGE_MODEL)
    video_stats = await scheduler_stats(VIDEO_MODEL)
    # The kills landed on running work: image batches ran again, video runs were lost.
    assert image_stats.get("worker_lost", 0) >= 1, image_stats
    assert video_stats["lost"] >= 1 and sum(job.runs_lost for job in jobs) >= 1, video_stats
    statuses = Counter((a.account.split("-")[0], a.status) for a in load.images)
    print(f"\nworker kills: {len(kills)}; images {dict(statuses)}; videos", end=" ")
    print(Counter(job.status for job in jobs), f"runs lost {sum(j.runs_lost for j in jobs)}")


async def test_scheduler_replicas_killed_under_mixed_load(app: FaultApp) -> None:
    """The schedulers hold the queues in memory: the image callers waiting in one get a
    503 to retry at once (not charged); queued and running video jobs are in the store
    and the new video scheduler takes them up again."""
    kills: list[float] = []
    back: list[float] = []  # when a probe was first served after the last kill

    async def faults(load: Load) -> None:
        for _ in range(2):
            await asyncio.sleep(LOAD_S / 4)
            for model in (IMAGE_MODEL, VIDEO_MODEL):
                assert await asyncio.to_thread(kill_replicas, f"Scheduler-{model}") == 1
            kills.append(time.monotonic())
            while (await load.image("pro-probe")).status != 200:
                assert time.monotonic() - kills[-1] < 60, "the image scheduler never came back"
                await asyncio.sleep(0.5)
            back.append(time.monotonic())
        await asyncio.sleep(LOAD_S / 2)

    load = await run_load(app, "schedulers", faults)
    usage = await check_images_and_quota(app, load)
    jobs = await check_videos(app, load, usage)
    # The workers lived: no video job lost a run, so every one completed.
    assert [job.status for job in jobs] == ["completed"] * len(jobs), jobs
    # Once Serve had replaced the schedulers, pro requests were served again.
    pro_after = [
        (round(a.sent_at - back[-1], 1), a.status)
        for a in images_during(load, back[-1], time.monotonic())
        if a.account.startswith("pro")
    ]
    assert pro_after and {status for _, status in pro_after} == {200}, pro_after
    statuses = Counter((a.account.split("-")[0], a.status) for a in load.images)
    again = ", ".join(f"{served - killed:.1f}s" for killed, served in zip(kills, back, strict=True))
    print(f"\nscheduler kills: {len(kills)}, served again {again} later;")
    print(f"images {dict(statuses)}; videos {len(jobs)}")


async def test_file_store_cut_for_30s_under_mixed_load(app: FaultApp) -> None:
    """While S3 is unreachable: image URLs are refused (503, not charged), base64 images
    are served, a finished video waits to store its files; afterwards every job
    completes with whole files and nothing is refused for the outage."""
    outage: list[float] = []  # monotonic: when cut, when restored
    restored_at = 0.0  # wall clock, as the jobs' times are
    probes: list[ImageAnswer] = []  # sent while it is away, clear of boto's own retries

    async def faults(load: Load) -> None:
        nonlocal restored_at
        await asyncio.sleep(5)
        app.store.cut()
        outage.append(time.monotonic())
        await asyncio.sleep(2)
        probes.append(await load.image("pro-probe", "url"))
        probes.append(await load.image("pro-probe", "b64_json"))
        await asyncio.sleep(outage[0] + STORE_OUTAGE_S - time.monotonic())
        app.store.restore()
        outage.append(time.monotonic())
        restored_at = time.time()
        await asyncio.sleep(10)

    load = await run_load(app, "store", faults)
    cut, restored = outage
    usage = await check_images_and_quota(app, load)
    jobs = await check_videos(app, load, usage)
    assert [job.status for job in jobs] == ["completed"] * len(jobs), jobs
    url_probe, b64_probe = probes
    assert (url_probe.status, url_probe.code) == (503, "store_unavailable"), url_probe
    assert b64_probe.status == 200, b64_probe
    during = [a for a in images_during(load, cut + 1, restored) if a.response_format == "url"]
    assert not [a for a in during if a.status == 200 and a.sent_at < restored - 25], during
    after = images_during(load, restored + 3, time.monotonic())
    assert not [a for a in after if a.code == "store_unavailable"], after
    # Jobs made while the store was away waited it out and completed once it was back.
    waited = [j for j in jobs if j.created_at < restored_at - 5 < restored_at < j.completed_at]
    assert waited, [(job.created_at, job.completed_at, restored_at) for job in jobs]
    print(f"\nstore cut {restored - cut:.0f}s; probes {url_probe.status}/{b64_probe.status};")
    print(f"videos {len(jobs)}, {len(waited)} of them waited for the store")
