"""What adding a model does to a model already serving (issue 20's check): its p99
latency while `mediagate models add` runs, against its p99 before.

1. `mediagate up` (its own Ray, own ports, a temporary home) serving tiny-sd alone,
   with the shipped tier file's quotas off.
2. Closed-loop clients (``--clients``, one request after another each) ask tiny-sd for
   64x64 images for ``--before-s``: the baseline.
3. `mediagate models add tiny-b --like tiny-sd --gpus 0` while they go on: the new
   application loads and warms up its replica, the router starts routing to it. The
   "during" window is the command's run.
4. ``--after-s`` more, then `mediagate down`.

Reported: p50/p99 per window, their ratios during/before, errors, how long the add
took, the CPU seconds each process spent during it (by process title: the new
application's replicas, Serve's build task, the command), and whether tiny-sd's
replicas stayed the same. On a 2-core machine the new
replica's start competes with tiny-sd's for the CPU (on a GPU cluster it starts on
another node): that competition is in the figures. Last line: one JSON object.

Usage: python scripts/bench_model_change.py [--before-s 60] [--after-s 10]
       [--clients 2] [--existing [--name tiny-b]] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from benchmarking import free_port, percentile, write_tiers_without_quotas

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' config writer
from tests.integration.conftest import write_tiny_sd_config

MEDIAGATE = str(Path(sys.executable).with_name("mediagate"))
FIRST = ("TextToImage-tiny-sd", "Scheduler-tiny-sd")


class Clients:
    """Closed-loop callers of one model; every answer kept as (sent, seconds, status)."""

    def __init__(self, base_url: str, key: str, model: str, count: int) -> None:
        self.answers: list[tuple[float, float, int]] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(base_url, key, model), daemon=True)
            for _ in range(count)
        ]

    def _run(self, base_url: str, key: str, model: str) -> None:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    status = client.post(
                        "/v1/images/generations",
                        json={"prompt": "a lighthouse", "model": model, "size": "64x64"},
                        headers={"Authorization": f"Bearer {key}"},
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((sent, time.monotonic() - sent, status))

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=180)

    def window(self, start: float, end: float) -> dict[str, Any]:
        inside = [(took, status) for sent, took, status in self.answers if start <= sent < end]
        took_ms = [took * 1000 for took, status in inside if status == 200]
        return {
            "requests": len(inside),
            "errors": sum(1 for _, status in inside if status != 200),
            "p50_ms": round(percentile(took_ms, 50), 1),
            "p99_ms": round(percentile(took_ms, 99), 1),
        }


class CpuByProcess:
    """CPU seconds the machine's processes spend while it runs, per process title (a
    Ray worker's title names what it runs at the time: a replica, a task, IDLE):
    what the add cost, and who paid it. Sampled every ``every_s``; a process's CPU
    between two samples goes to the title it had at the second, and a process started
    meanwhile counts from its start. The command itself is measured apart (its
    children's rusage), not sampled: it may live less than a sample's interval."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.seconds: dict[str, float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._children_before = 0.0

    def _sample(self) -> None:
        import psutil

        for process in psutil.process_iter(["cmdline", "name", "cpu_times", "create_time"]):
            times, created = process.info["cpu_times"], process.info["create_time"]
            title = " ".join(process.info["cmdline"] or [process.info["name"] or "?"])
            if times is None or created is None or "models add" in title:
                continue
            used = times.user + times.system
            key = (process.pid, created)
            before = self._last.get(key, 0.0 if created >= self._started else None)
            self._last[key] = used
            if before is None or used <= before:
                continue
            title = title.split()[0] if title.startswith("ray::") else process.info["name"]
            self.seconds[title] = self.seconds.get(title, 0.0) + used - before

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> CpuByProcess:
        self._sample()  # the baseline
        self._children_before = _children_cpu_s()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds["the `mediagate models add` command"] = (
            _children_cpu_s() - self._children_before
        )

    def busiest(self, count: int = 8) -> dict[str, float]:
        ranked = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:count]
        return {title: round(seconds, 1) for title, seconds in ranked}


def _children_cpu_s() -> float:
    """CPU seconds of this process's children that have ended (the commands run)."""
    import resource

    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def replica_ids(dashboard_url: str, token: str) -> dict[str, list[str]]:
    details = httpx.get(
        f"{dashboard_url}/api/serve/applications/",
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    found = {
        name: deployment
        for app in details["applications"].values()
        for name, deployment in app["deployments"].items()
    }
    return {
        name: sorted(r["replica_id"] for r in found[name]["replicas"] if r["state"] == "RUNNING")
        for name in FIRST
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-s", type=float, default=60.0)
    parser.add_argument("--after-s", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument(
        "--existing",
        action="store_true",
        help="use the `mediagate up` of $MEDIAGATE_HOME (it serves tiny-sd, CPUs for one "
        "more replica, RAY_AUTH_TOKEN set) instead of starting one; the added model is "
        "removed again",
    )
    parser.add_argument("--name", default="tiny-b", help="the model to add")
    parser.add_argument("--smoke", action="store_true", help="a few seconds per window")
    args = parser.parse_args()
    if args.smoke:
        args.before_s, args.after_s, args.clients = 3.0, 1.0, 1
    with tempfile.TemporaryDirectory(prefix="mg-bench-models-") as scratch:
        env = dict(os.environ)
        if not args.existing:
            env |= {"MEDIAGATE_HOME": scratch, "RAY_AUTH_TOKEN": secrets.token_hex(32)}

        def cli(*command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [MEDIAGATE, *command], env=env, capture_output=True, text=True, timeout=900
            )

        home = Path(env["MEDIAGATE_HOME"]).expanduser()
        if not args.existing:
            port, dashboard_port, ray_port = free_port(), free_port(), free_port()
            up = cli(
                "up", "--detach", "--port", str(port),
                "--config", str(write_tiny_sd_config(home, write_tiers_without_quotas(home))),
                "--dashboard-port", str(dashboard_port), "--ray-port", str(ray_port),
            )  # fmt: skip
            if up.returncode != 0:
                raise SystemExit(f"mediagate up failed:\n{up.stderr[-3000:]}")
        run = json.loads((home / "run.json").read_text())
        base_url, dashboard_url = run["base_url"], run["dashboard_url"]
        token = env["RAY_AUTH_TOKEN"]
        try:
            created = cli("keys", "create", "--tier", "pro", "--account", "bench")
            key = created.stdout.strip().splitlines()[-1]
            before_ids = replica_ids(dashboard_url, token)
            with Clients(base_url, key, "tiny-sd", args.clients) as clients:
                time.sleep(1.0)  # past the first requests' warm-up
                start = time.monotonic()
                time.sleep(args.before_s)
                change_started = time.monotonic()
                with CpuByProcess() as cpu:
                    added = cli("models", "add", args.name, "--like", "tiny-sd", "--gpus", "0")
                change_ended = time.monotonic()
                time.sleep(args.after_s)
                ended = time.monotonic()
            if added.returncode != 0:
                raise SystemExit(f"models add failed:\n{added.stderr[-3000:]}")
            new_model = httpx.post(
                f"{base_url}/v1/images/generations",
                json={"prompt": "a lighthouse", "model": args.name, "size": "64x64"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=120,
            ).status_code
            after_ids = replica_ids(dashboard_url, token)
        finally:
            if args.existing:
                cli("models", "remove", args.name, "--now")
            else:
                cli("down")
    before = clients.window(start, change_started)
    during = clients.window(change_started, change_ended)
    after = clients.window(change_ended, ended)
    print(
        json.dumps(
            {
                "clients": args.clients,
                "before": before,
                "during_add": during,
                "after": after,
                "add_s": round(change_ended - change_started, 1),
                "cpu_s_during_add": cpu.busiest(),
                "p99_ratio_during": round(during["p99_ms"] / before["p99_ms"], 3),
                "p50_ratio_during": round(during["p50_ms"] / before["p50_ms"], 3),
                "errors": before["errors"] + during["errors"] + after["errors"],
                "first_model_replicas_unchanged": before_ids == after_ids,
                "new_model_status": new_model,
            }
        )
    )


if __name__ == "__main__":
    main()
