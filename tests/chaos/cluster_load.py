"""Mixed load against a mediagate application on the test session's Ray cluster, and
what it saw: image requests (base64 and URL), video jobs followed to their end, and
the faults injected meanwhile (replicas killed, the file store cut).

The application serves ``tiny-sd`` and ``tiny-wan`` with the production backends: a
real redis-server holds state and moto's S3 server holds files, reached through a
``CuttableProxy`` so that the store can go away and come back with its objects.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from mediagate.access.accounts import open_account_store
from mediagate.access.ledger import QuotaLedger
from mediagate.access.tiers import TierPolicy, load_tier_policy, shipped_tier_config
from mediagate.stores import StateConfig, VideoJobRecord, open_state_store
from mediagate.stores.artifacts import ArtifactConfig
from tests.servers import CuttableProxy, moto_s3_server, redis_server

APP = "faults"
IMAGE_MODEL, VIDEO_MODEL = "tiny-sd", "tiny-wan"
# A video job of a few seconds here (65 frames, 12 steps), long enough to be caught
# mid-run by a kill.
VIDEO_BODY = {"model": VIDEO_MODEL, "seconds": "8", "num_inference_steps": 12}
ANSWER_TIMEOUT_S = 90  # longer than any tier's queue wait plus a run: reaching it is a hang
FREE_MAX_WAIT_S = 30  # the shipped free tier's longest queue wait


@dataclass(frozen=True)
class FaultApp:
    base_url: str
    state: StateConfig
    store: CuttableProxy
    keys: dict[str, str]  # account name -> API key
    tiers_file: str

    def tier_policy(self) -> TierPolicy:
        return load_tier_policy(self.tiers_file)

    def auth(self, account: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[account]}"}


def zone_at_midday(now: datetime) -> str:
    """A fixed-offset zone in which ``now`` (UTC) is about noon: a quota day there does not
    end during a test, so images counted before and after a scenario are of one day (a
    run across midnight UTC once saw two images of a scenario "given back" by the day
    rolling over)."""
    hours_behind_utc = now.hour - 12  # Etc/GMT+N is N hours behind UTC (POSIX sign)
    return "Etc/GMT" if hours_behind_utc == 0 else f"Etc/GMT{hours_behind_utc:+d}"


def midday_tiers_file(home: Path) -> str:
    """The shipped tiers with the quota day in ``zone_at_midday``."""
    tiers = shipped_tier_config() | {"timezone": zone_at_midday(datetime.now(UTC))}
    path = home / "tiers-midday.yaml"
    path.write_text(yaml.safe_dump(tiers))
    return str(path)


@contextmanager
def fault_app(serve_port: int, home: Path, accounts: dict[str, str]) -> Iterator[FaultApp]:
    """The application deployed on the session's Ray cluster (``accounts``: name -> tier);
    workers ask for no CPU so that it fits beside the session's other applications."""
    from ray import serve

    from deployments.app import AppArgs, build_app

    with redis_server() as redis, moto_s3_server() as moto:
        proxy = CuttableProxy(int(moto.endpoint_url.rsplit(":", 1)[1]))
        bucket = f"faults-{uuid.uuid4().hex[:8]}"
        moto.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        state = StateConfig(backend="redis", redis_url=redis.url)
        tiers_file = midday_tiers_file(home)
        args = AppArgs(
            home=str(home),
            tiers_file=tiers_file,
            models=[IMAGE_MODEL, VIDEO_MODEL],
            worker_ray_actor_options={"num_cpus": 0, "num_gpus": 0},
            state=state,
            artifacts=ArtifactConfig(
                backend="s3", s3_bucket=bucket, s3_endpoint_url=proxy.url, s3_region="us-east-1"
            ),
            router={"poll_after_ms": 100},
            video={"lease_s": 3, "reconcile_s": 0.5, "max_attempts": 3},
        )
        serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
        store = open_account_store(state)
        keys = {
            name: store.create_key(store.ensure_account(name, tier).id)
            for name, tier in accounts.items()
        }
        try:
            yield FaultApp(f"http://127.0.0.1:{serve_port}/{APP}", state, proxy, keys, tiers_file)
        finally:
            serve.delete(APP)
            proxy.close()


def replica_names(deployment: str) -> list[tuple[str, str]]:
    """(name, namespace) of each live replica actor of ``deployment`` in the app."""
    import ray

    return [
        (actor["name"], actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if f"{APP}#{deployment}#" in actor["name"]
    ]


def kill_replicas(deployment: str, wait_s: float = 60) -> int:
    """Kill every replica of ``deployment`` at once, as Serve's fault-tolerance guide
    does (``ray.kill``: running calls fail at once; Serve starts a replacement). A
    replacement still starting is waited for (up to ``wait_s``)."""
    import ray

    deadline = time.monotonic() + wait_s
    while not (names := replica_names(deployment)) and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = 0
    for name, namespace in names:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
            killed += 1
        except ValueError:  # gone already
            pass
    return killed


async def scheduler_stats(model: str) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle(f"Scheduler-{model}", app_name=APP)
    return dict(await handle.stats.remote())


def error_code(response: httpx.Response) -> str:
    """The OpenAI envelope's ``code`` ("!" if the body is not that envelope)."""
    try:
        return str(response.json()["error"].get("code") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "!"


@dataclass(frozen=True)
class ImageAnswer:
    account: str
    response_format: str
    status: int
    code: str
    retry_after: str | None
    sent_at: float  # time.monotonic()
    took_s: float
    error: str = ""  # the client's own failure (a hang or a reset), if any


@dataclass
class Load:
    """Runs callers until ``stop`` and keeps what each saw."""

    app: FaultApp
    http: httpx.AsyncClient
    usage_before: dict[str, tuple[int, int]]  # the ledger's figures when the load began
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    images: list[ImageAnswer] = field(default_factory=list)
    video_ids: dict[str, str] = field(default_factory=dict)  # job id -> account
    video_refusals: list[tuple[int, str]] = field(default_factory=list)
    # polls and downloads (0: an image URL that S3 itself could not serve)
    other_statuses: Counter[int] = field(default_factory=Counter)

    async def image(self, account: str, response_format: str = "b64_json") -> ImageAnswer:
        body = {
            "model": IMAGE_MODEL,
            "prompt": f"a lighthouse for {account}",
            "response_format": response_format,
        }
        sent = time.monotonic()
        try:
            response = await self.http.post(
                "/v1/images/generations", json=body, headers=self.app.auth(account)
            )
        except httpx.HTTPError as error:
            answer = ImageAnswer(account, response_format, 0, "", None, sent, 0.0, repr(error))
        else:
            code = "" if response.is_success else error_code(response)
            if response.is_success and response_format == "url":
                await self._check_download(response.json()["data"][0]["url"])
            answer = ImageAnswer(
                account,
                response_format,
                response.status_code,
                code,
                response.headers.get("retry-after"),
                sent,
                time.monotonic() - sent,
            )
        self.images.append(answer)
        return answer

    async def _check_download(self, url: str) -> None:
        """An image URL handed out downloads a whole PNG (nothing half-written)."""
        from PIL import Image

        async with httpx.AsyncClient(timeout=30) as plain:
            try:
                response = await plain.get(url)
            except httpx.HTTPError:  # straight from S3, which may be what is cut
                self.other_statuses[0] += 1
                return
        self.other_statuses[response.status_code] += 1
        if response.is_success:
            Image.open(io.BytesIO(response.content)).verify()

    async def image_caller(self, account: str, pause_s: float, fmt: str = "b64_json") -> None:
        while not self.stop.is_set():
            await self.image(account, fmt)
            await asyncio.sleep(pause_s)

    async def free_caller(self, account: str, attempts: int, spread_s: float) -> None:
        """A free user: a few tries spread over the run, until 3 images or ``attempts``."""
        for _ in range(attempts):
            if self.stop.is_set():
                return
            answer = await self.image(account)
            if (
                answer.status == 200
                and sum(1 for a in self.images if a.account == account and a.status == 200) >= 3
            ):
                return
            await asyncio.sleep(spread_s)

    async def video_caller(self, account: str, prompt: str) -> None:
        """Create a job, follow it to its end, repeat until stopped."""
        number = 0
        while not self.stop.is_set():
            number += 1
            response = await self.http.post(
                "/v1/videos",
                json={**VIDEO_BODY, "prompt": f"{prompt} {number}"},
                headers=self.app.auth(account),
            )
            if response.status_code != 200:
                self.video_refusals.append((response.status_code, response.text))
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            job_id = response.json()["id"]
            self.video_ids[job_id] = account
            await self.follow(account, job_id, timeout_s=240)

    async def follow(self, account: str, job_id: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = await self.http.get(f"/v1/videos/{job_id}", headers=self.app.auth(account))
            self.other_statuses[response.status_code] += 1
            if response.is_success and response.json()["status"] in ("completed", "failed"):
                return dict(response.json())
            await asyncio.sleep(0.2)
        raise AssertionError(f"video {job_id} never ended")

    async def video_files(self, account: str, job_id: str) -> dict[str, bytes]:
        """Each of a completed job's files, downloaded through the API."""
        files = {}
        async with httpx.AsyncClient(base_url=self.app.base_url, timeout=30) as http:
            for variant in ("video", "thumbnail", "spritesheet"):
                response = await http.get(
                    f"/v1/videos/{job_id}/content",
                    params={"variant": variant},
                    headers=self.app.auth(account),
                )
                assert response.status_code == 200, (job_id, variant, response.text)
                files[variant] = response.content
        return files


async def usage_by_account(app: FaultApp) -> dict[str, tuple[int, int]]:
    """(images today, video jobs held) per account, as the quota ledger has them."""
    accounts = open_account_store(app.state)
    store = open_state_store(app.state)
    ledger = QuotaLedger(store, app.tier_policy())
    usage = {}
    try:
        for name in app.keys:
            account = accounts.get_account(name)
            assert account is not None, name
            held = await ledger.usage(account)
            usage[name] = (held.images_today, held.video_jobs_active)
    finally:
        await store.close()
    return usage


async def stored_jobs(app: FaultApp, jobs: dict[str, str]) -> list[VideoJobRecord]:
    accounts = open_account_store(app.state)
    store = open_state_store(app.state)
    try:
        found = []
        for job_id, name in jobs.items():
            account = accounts.get_account(name)
            assert account is not None, name
            job = await store.get_job(account.id, job_id)
            assert job is not None, job_id
            found.append(job)
        return found
    finally:
        await store.close()


def decode_frames(mp4: bytes) -> int:
    import av

    with av.open(io.BytesIO(mp4), mode="r") as container:
        return sum(1 for _ in container.decode(video=0))
