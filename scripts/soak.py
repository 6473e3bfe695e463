"""Thirty minutes of mixed load on the real service, watching for leaks (issue 15's soak).

mediagate as `mediagate up` runs it (local Ray, HAProxy in front, the tiny image and
video models; SQLite state and local files, or `--state redis` with its own
redis-server), with retention short enough to come round several times in the run
(image URLs 60 s, video content 90 s, a sweep every 15 s). The load, all at once:

- pro image callers, base64 and URL (URLs downloaded), paced under their 60/minute;
- free users, one request a second, none waiting for another's answer, 3 images a
  day each, then 429s (a free request shed early, 503 server_overloaded, is
  counted as ``free shed``: shedding by design, not a server error);
- bad requests (401, 400, 404) and Idempotency-Key replays of ten keys;
- one video caller: create, follow to the end, download, again.

Every ``--sample-s``: RSS and open file descriptors of the router, the schedulers and
the workers; state rows (SQLite) or keys (Redis); artifact files. Prints a table and,
on its last line, one JSON object with the issue's criteria: RSS within 5% and no
file-descriptor growth over the last 20 minutes, rows/keys and files flat, pro p99 of
the last 5 minutes within 10% of the first 5 (after a minute of warm-up, in which
the free users also use up their quotas), no 5xx. A replica that restarted (its
process changed) is reported: nothing should.
Usage: python scripts/soak.py [--minutes 30] [--sample-s 30] [--state sqlite|redis]
       [--free-accounts 20] [--warmup-s 60] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from benchmarking import actor_pids, free_port, percentile, start_local_serve

APP = "mediagate"
WATCHED = ["Router", "Scheduler-tiny-sd", "Scheduler-tiny-wan", "TextToImage-tiny-sd"]
WATCHED += ["TextToVideo-tiny-wan"]
PRO_ACCOUNTS, REPLAYED_KEYS = 3, 10


@dataclass
class Soak:
    base_url: str
    keys: dict[str, str]
    seconds: float
    free_accounts: int
    warmup_s: float  # not counted in the first window (model warm-up, the free quotas)
    started: float = field(default_factory=time.monotonic)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    pro_latencies: list[tuple[float, float]] = field(default_factory=list)  # (at s, latency s)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def running(self) -> bool:
        return time.monotonic() - self.started < self.seconds

    async def resilient(self, caller: Callable[[], Awaitable[None]]) -> None:
        """Run ``caller`` to the end of the soak: a transport failure (a timeout, a
        reset) is counted and the caller starts again."""
        while self.running():
            try:
                await caller()
            except httpx.HTTPError as error:
                self.statuses[(f"transport {type(error).__name__}", 0)] += 1
            except Exception as error:  # counted, not lost in a task nobody awaits
                self.statuses[(f"client {type(error).__name__}", 0)] += 1
                await asyncio.sleep(1)

    def auth(self, account: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[account]}"}

    async def image(
        self, http: httpx.AsyncClient, account: str, *, timed: bool = False, **body: Any
    ) -> httpx.Response:
        """One generation; ``timed`` ones (the pro callers') make the p99 figures."""
        headers = self.auth(account) | body.pop("headers", {})
        sent = time.monotonic()
        response = await http.post(
            "/v1/images/generations",
            json={"model": "tiny-sd", "prompt": f"soak {account}", **body},
            headers=headers,
        )
        self.statuses[(image_kind(account, response), response.status_code)] += 1
        if timed and response.status_code == 200:
            self.pro_latencies.append((sent - self.started, time.monotonic() - sent))
        return response

    async def pro_caller(self, http: httpx.AsyncClient, account: str, fmt: str) -> None:
        while self.running():
            response = await self.image(http, account, timed=True, response_format=fmt)
            if response.status_code == 200 and fmt == "url":
                download = await http.get(response.json()["data"][0]["url"])
                self.statuses[("download", download.status_code)] += 1
            await asyncio.sleep(1.5)

    async def free_users(self, http: httpx.AsyncClient) -> None:
        """One free request a second, each from its own user, none waiting for another's
        answer (free users are many people, not one queue): the quotas run out after
        ``3 * free_accounts`` requests however long each takes to serve."""

        async def one(account: str) -> None:
            try:
                await self.image(http, account)
            except httpx.HTTPError as error:
                self.statuses[(f"transport {type(error).__name__}", 0)] += 1
            except Exception as error:  # counted, not lost in a task nobody awaits
                self.statuses[(f"client {type(error).__name__}", 0)] += 1

        sent: set[asyncio.Task[None]] = set()
        number = 0
        while self.running():
            task = asyncio.create_task(one(f"free-{number % self.free_accounts}"))
            sent.add(task)
            task.add_done_callback(sent.discard)
            number += 1
            await asyncio.sleep(1.0)
        await asyncio.gather(*sent)

    async def bad_requests(self, http: httpx.AsyncClient) -> None:
        pro = self.auth("pro-0")
        bad = [
            ({"prompt": "x"}, {"Authorization": "Bearer mg-not-a-key"}),
            ({"prompt": "x", "size": "13x7"}, pro),
            ({"prompt": "x", "model": "no-such-model"}, pro),
            ({"prompt": ""}, pro),
        ]
        number = 0
        while self.running():
            body, headers = bad[number % len(bad)]
            response = await http.post("/v1/images/generations", json=body, headers=headers)
            self.statuses[("bad", response.status_code)] += 1
            number += 1
            await asyncio.sleep(2.0)

    async def replays(self, http: httpx.AsyncClient) -> None:
        number = 0
        while self.running():
            key = {"Idempotency-Key": f"soak-{number % REPLAYED_KEYS}"}
            await self.image(http, "pro-replays", headers=key)
            number += 1
            await asyncio.sleep(3.0)

    async def videos(self, http: httpx.AsyncClient) -> None:
        auth = self.auth("pro-videos")
        while self.running():
            created = await http.post(
                "/v1/videos", json={"model": "tiny-wan", "prompt": "soak"}, headers=auth
            )
            self.statuses[("video", created.status_code)] += 1
            if created.status_code != 200:
                await asyncio.sleep(5)
                continue
            job_id = created.json()["id"]
            status = "queued"
            while status in ("queued", "in_progress"):
                await asyncio.sleep(0.5)
                polled = await http.get(f"/v1/videos/{job_id}", headers=auth)
                self.statuses[("poll", polled.status_code)] += 1
                status = polled.json().get("status", "error") if polled.is_success else "error"
            self.statuses[("video " + status, 200)] += 1
            if status == "completed":
                content = await http.get(f"/v1/videos/{job_id}/content", headers=auth)
                self.statuses[("download", content.status_code)] += 1
            await asyncio.sleep(3.0)


def process_figures(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    import psutil

    figures = {}
    for name, pid in pids.items():
        try:
            process = psutil.Process(pid)
            figures[name] = {
                "rss_mb": process.memory_info().rss / 2**20,
                "fds": float(process.num_fds()),
            }
        except psutil.Error:
            figures[name] = {"rss_mb": float("nan"), "fds": float("nan")}
    return figures


def state_size(home: Path, redis_port: int | None) -> int:
    """Rows of the SQLite state (jobs and account documents), or Redis keys."""
    if redis_port is not None:
        import redis

        return int(redis.Redis(port=redis_port).dbsize())
    with contextlib.closing(sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)) as db:
        return sum(
            db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("video_jobs", "account_docs")
        )


def take_sample(soak: Soak, home: Path, redis_port: int | None, pids: dict[str, int]) -> None:
    now_pids = actor_pids(APP, WATCHED)
    soak.samples.append(
        {
            "at_s": round(time.monotonic() - soak.started, 1),
            "processes": process_figures(now_pids),
            "restarted": sorted(name for name in pids if now_pids.get(name) != pids[name]),
            "state": state_size(home, redis_port),
            "files": sum(1 for path in (home / "artifacts").glob("*") if path.is_file()),
        }
    )


def image_kind(account: str, response: httpx.Response) -> str:
    """``image``, or ``free shed`` for a free request refused early (503
    server_overloaded) so paid traffic keeps its times: shedding by design, not a
    server error. Any other 5xx, and a paid request shed, stay server errors."""
    if response.status_code != 503 or not account.startswith("free-"):
        return "image"
    try:
        code = response.json().get("error", {}).get("code")
    except ValueError:  # not our envelope: a proxy's or a crash's page, a server error
        return "image"
    return "free shed" if code == "server_overloaded" else "image"


async def run(soak: Soak, home: Path, redis_port: int | None, sample_s: float) -> None:
    pids = actor_pids(APP, WATCHED)

    async def sampler() -> None:
        while True:
            try:
                await asyncio.to_thread(take_sample, soak, home, redis_port, pids)
            except Exception as error:  # counted: a summary of too few samples says so
                soak.statuses[(f"sample failed: {error!r}"[:80], -1)] += 1
            await asyncio.sleep(sample_s)

    async with httpx.AsyncClient(base_url=soak.base_url, timeout=120) as http:
        sampling = asyncio.create_task(sampler())
        callers: list[Callable[[], Awaitable[None]]] = [
            functools.partial(soak.pro_caller, http, f"pro-{n}", "b64_json")
            for n in range(PRO_ACCOUNTS)
        ]
        callers += [functools.partial(soak.pro_caller, http, "pro-urls", "url")]
        callers += [
            functools.partial(caller, http)
            for caller in (soak.free_users, soak.bad_requests, soak.replays, soak.videos)
        ]
        await asyncio.gather(*(soak.resilient(caller) for caller in callers))
        sampling.cancel()
    take_sample(soak, home, redis_port, pids)  # the end of the run closes the table


def growth_pct(values: list[float]) -> float:
    """How far the largest of ``values`` is above the first, in percent."""
    return round(100 * (max(values) - values[0]) / values[0], 2) if values[0] else 0.0


def quarter_trend(values: list[float]) -> float:
    """The median of the last quarter of ``values`` minus that of the first quarter."""
    quarter = max(1, len(values) // 4)
    return statistics.median(values[-quarter:]) - statistics.median(values[:quarter])


def drift(values: list[float]) -> float:
    """The mean of the last quarter of ``values`` over the mean of the first quarter:
    a count that keeps growing is well above 1; one that comes and goes with the sweep
    stays near it."""
    quarter = max(1, len(values) // 4)
    first = sum(values[:quarter]) / quarter
    return round(sum(values[-quarter:]) / quarter / first, 3) if first else 1.0


def summarize(soak: Soak, minutes: float) -> dict[str, Any]:
    window_s = min(20 * 60, soak.seconds * 2 / 3)  # "the last 20 minutes"
    edge_s = min(5 * 60, soak.seconds / 4)  # "the first / last 5 minutes"
    late = [s for s in soak.samples if s["at_s"] >= soak.seconds - window_s]
    names = [name for name in late[0]["processes"] if all(name in s["processes"] for s in late)]

    def series(name: str, figure: str) -> list[float]:
        return [s["processes"][name][figure] for s in late]

    rss = {name: growth_pct(series(name, "rss_mb")) for name in names}
    # Descriptors come and go with connections: a leak is a trend, the median of the
    # window's last quarter above that of its first.
    fds = {name: quarter_trend(series(name, "fds")) for name in names}
    first_window = soak.warmup_s, soak.warmup_s + edge_s
    first_p99 = percentile(
        [lat for at, lat in soak.pro_latencies if first_window[0] <= at < first_window[1]], 99
    )
    last_start = soak.seconds - edge_s
    last_p99 = percentile([lat for at, lat in soak.pro_latencies if at >= last_start], 99)
    server_errors = {  # answers of 5xx, and requests that got no answer (status 0)
        f"{kind} {status}": n
        for (kind, status), n in soak.statuses.items()
        if (status >= 500 and kind != "free shed") or status == 0
    }
    state, files = [s["state"] for s in late], [s["files"] for s in late]
    result: dict[str, Any] = {
        "minutes": minutes,
        "p99_windows_s": {"first": first_window, "last": (last_start, soak.seconds)},
        "requests": {f"{kind} {status}": n for (kind, status), n in sorted(soak.statuses.items())},
        "server_errors": server_errors,
        "rss_growth_last_window_pct": rss,
        "rss_mb_end": {n: round(v["rss_mb"], 1) for n, v in late[-1]["processes"].items()},
        "fd_trend_last_window": fds,
        "state_rows_or_keys": {"window_start": state[0], "max": max(state), "end": state[-1]},
        "state_drift": drift(state),
        "artifact_files": {"window_start": files[0], "max": max(files), "end": files[-1]},
        "files_drift": drift(files),
        "replicas_restarted": sorted({name for s in soak.samples for name in s["restarted"]}),
        "pro_p99_first_ms": round(first_p99 * 1000, 1),
        "pro_p99_last_ms": round(last_p99 * 1000, 1),
        "p99_ratio_last_to_first": round(last_p99 / first_p99, 3),
    }
    result["targets_met"] = {
        "no_5xx": not server_errors,
        "rss_within_5pct": all(value <= 5 for value in rss.values()),
        "no_fd_growth": all(value <= 1 for value in fds.values()),
        "state_and_files_flat": result["state_drift"] <= 1.1 and result["files_drift"] <= 1.1,
        "p99_within_10pct": result["p99_ratio_last_to_first"] <= 1.10,
        "no_restarts": not result["replicas_restarted"],
        "enough_samples": len(late) >= 3 and len(names) == len(WATCHED),
    }
    return result


def start_redis(scratch: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--state redis needs redis-server (apt-get install redis-server)")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(scratch)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return server, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--sample-s", type=float, default=30)
    parser.add_argument("--state", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument(
        "--free-accounts",
        type=int,
        default=20,
        help="free users asked for in turn, one a second: each is served 3 images in the "
        "first minutes, then refused (429) for the rest of the run",
    )
    parser.add_argument("--warmup-s", type=float, default=60, help="left out of the first window")
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes")
    args = parser.parse_args()
    if args.smoke:
        # two free accounts: their 3-a-day quotas run out (429) after 6 s of requests
        args.minutes, args.sample_s, args.free_accounts, args.warmup_s = 0.4, 3.0, 2, 0.0
    from ray import serve

    from deployments.app import AppArgs, build_app
    from mediagate.access.accounts import open_account_store
    from mediagate.cli.service import stop_own_ray
    from mediagate.stores import StateConfig

    gc.disable()  # the generator's own collections would pause it (see bench_overload.py)
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        redis, redis_port = start_redis(home) if args.state == "redis" else (None, None)
        state = (
            StateConfig(backend="redis", redis_url=f"redis://127.0.0.1:{redis_port}/0")
            if redis_port
            else StateConfig.embedded(home / "state.db")
        )
        port = start_local_serve(home, "haproxy")
        app_args = AppArgs(
            home=str(home),
            models=["tiny-sd", "tiny-wan"],
            state=state,
            worker_ray_actor_options={"num_cpus": 1, "num_gpus": 0},
            router={"url_ttl_s": 60, "artifact_sweep_s": 15},
            video={"content_ttl_s": 90},
        )
        serve.run(build_app(app_args), name=APP, route_prefix="/")
        accounts = open_account_store(state)
        names = {f"pro-{n}": "pro" for n in range(PRO_ACCOUNTS)}
        names |= {"pro-urls": "pro", "pro-replays": "pro", "pro-videos": "pro"}
        names |= {f"free-{n}": "free" for n in range(args.free_accounts)}
        keys = {n: accounts.create_key(accounts.ensure_account(n, t).id) for n, t in names.items()}
        soak = Soak(
            f"http://127.0.0.1:{port}", keys, args.minutes * 60, args.free_accounts, args.warmup_s
        )
        try:
            asyncio.run(run(soak, home, redis_port, args.sample_s))
        finally:
            stop_own_ray()
            if redis is not None:
                redis.terminate()
    print(f"{'at s':>7} {'state':>6} {'files':>6}  RSS MB / fds: " + ", ".join(WATCHED))
    for row in soak.samples:
        figures = "  ".join(
            f"{row['processes'][n]['rss_mb']:.0f}/{row['processes'][n]['fds']:.0f}"
            for n in WATCHED
            if n in row["processes"]
        )
        print(f"{row['at_s']:>7} {row['state']:>6} {row['files']:>6}  {figures}")
    print(json.dumps(summarize(soak, args.minutes)))


if __name__ == "__main__":
    main()
