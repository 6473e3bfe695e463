"""Autoscaling end to end: `mediagate up` deploys a config (the application-level policy
only applies to config deployments) with SIMULATED models on its own Ray cluster; a
burst grows the image workers and they shrink back; `mediagate scale set` changes the
limits during load without restarting a replica; an idle video model goes to zero
replicas and a new job brings it back.

Marked `own_ray_cluster`: it starts its own Ray head (with the dashboard, whose REST
API `mediagate scale` uses) before the session's shared cluster exists.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.browser import Watched, chromium, plotted
from tests.integration.conftest import (
    deployments_of,
    free_port,
    mediagate_up,
    write_unlimited_tiers,
    write_up_config,
)

MEDIAGATE = str(Path(sys.executable).with_name("mediagate"))
STEP_MS = 100
STEPS = 10  # one image: 1 s of simulated GPU time


@dataclass
class Cluster:
    env: dict[str, str]
    base_url: str
    dashboard_url: str
    keys: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MEDIAGATE, *args], env=self.env, capture_output=True, text=True, timeout=120
        )

    def details(self) -> dict[str, Any]:
        """GET /api/serve/applications/ with the cluster's token. Plain HTTP: Ray's own
        client would fix this process's token setting before the shared cluster starts."""
        answer = httpx.get(
            f"{self.dashboard_url}/api/serve/applications/",
            headers={"authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"},
            timeout=30,
        )
        answer.raise_for_status()
        return dict(answer.json())

    def replicas(self, deployment: str) -> list[str]:
        """Ids of the RUNNING replicas of ``deployment``."""
        found = deployments_of(self.details())[deployment]["replicas"]
        return sorted(r["replica_id"] for r in found if r["state"] == "RUNNING")

    def status(self) -> dict[str, Any]:
        """``GET /v1/status`` as a pro account sees it (queues, decisions, estimates)."""
        answer = httpx.get(
            f"{self.base_url}/v1/status",
            headers={"Authorization": f"Bearer {self.keys['pro']}"},
            timeout=30,
        )
        return dict(answer.json())

    def image(self, key: str = "pro") -> tuple[int, str]:
        """The status and the worker replica that made the image (the error body when
        there is none, so a failed assertion says why)."""
        answer = httpx.post(
            f"{self.base_url}/v1/images/generations",
            json={"prompt": "burst", "model": "sim"},
            headers={"Authorization": f"Bearer {self.keys[key]}"},
            timeout=300,
        )
        if answer.status_code != 200:
            return answer.status_code, answer.text
        return answer.status_code, answer.headers.get("x-mediagate-worker", "")


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds it took until ``condition()``; fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.25)
    return time.monotonic() - started


def write_config(home: Path) -> Path:
    catalog = {
        "default_models": {"text-to-image": "sim", "text-to-video": "simvid"},
        "models": {
            "sim": {
                "task": "text-to-image",
                "description": "SIMULATED image model (sleeps per step)",
                "source": f"simulated://sim?step_ms={STEP_MS}",
                "num_gpus": 0,
                "defaults": {"size": "64x64", "num_inference_steps": STEPS},
                "caps": {"max_width": 64, "max_height": 64, "max_steps": STEPS, "max_n": 1},
                "batching": {"max_batch_size": 1, "batch_wait_s": 0.0},
            },
            "simvid": {
                "task": "text-to-video",
                "description": "SIMULATED video model (sleeps per step)",
                "source": "simulated://simvid?step_ms=50",
                "num_gpus": 0,
                "defaults": {"size": "64x64", "num_inference_steps": 4},
                "caps": {"max_width": 64, "max_height": 64, "max_steps": 4, "max_n": 1},
                "scaling": {"min_replicas": 0, "max_replicas": 1},
                "video": {"fps": 8, "allowed_seconds": [4], "default_seconds": 4},
            },
        },
    }
    (home / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    tiers_file = write_unlimited_tiers(home)
    workers = {"num_cpus": 0, "num_gpus": 0}
    fast = {"metrics_interval_s": 0.5, "look_back_period_s": 1.0, "upscale_delay_s": 0.5}
    return write_up_config(
        home / "serve.sim.yaml",
        {"catalog": str(home / "catalog.yaml"), "tiers_file": str(tiers_file)},
        [
            {
                "name": "TextToImage-sim",
                "ray_actor_options": workers,
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 4,
                    "target_ongoing_requests": 1,
                    "downscale_delay_s": 3.0,
                    **fast,
                },
            },
            {
                "name": "TextToVideo-simvid",
                "ray_actor_options": workers,
                "autoscaling_config": {
                    "min_replicas": 0,
                    "max_replicas": 1,
                    "initial_replicas": 1,
                    "target_ongoing_requests": 1,
                    "downscale_delay_s": 2.0,
                    "downscale_to_zero_delay_s": 2.0,
                    **fast,
                },
            },
        ],
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("autoscale")
    port, dashboard_port, ray_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "MEDIAGATE_HOME": str(home),
        "MEDIAGATE_OPERATOR": "sre-test",
        # The cluster's own token (`ray start` takes it from here and turns token
        # authentication on), not whatever ~/.ray/auth_token holds on this machine.
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    up = mediagate_up(
        env,
        *("--config", str(write_config(home)), "--port", str(port)),
        *("--dashboard-port", str(dashboard_port), "--ray-port", str(ray_port)),
    )
    running = Cluster(
        env=env,
        base_url=f"http://127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        keys={},
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        for tier in ("pro", "free"):
            created = running.cli("keys", "create", "--tier", tier, "--account", f"as-{tier}")
            assert created.returncode == 0, created.stderr
            running.keys[tier] = created.stdout.strip().splitlines()[-1]
        created = running.cli(
            "keys", "create", "--tier", "pro", "--account", "as-ops", "--role", "operator"
        )
        assert created.returncode == 0, created.stderr
        running.keys["operator"] = created.stdout.strip().splitlines()[-1]
        yield running
    finally:
        subprocess.run([MEDIAGATE, "down"], env=env, capture_output=True, timeout=120)


def watch_plots(
    page: Any, *, until: Callable[[dict[str, float]], bool], limit_s: float
) -> list[dict[str, float]]:
    """What the operations view plots for `sim` (queued in all, replicas), each time it
    samples, until ``until`` holds."""
    seen: list[dict[str, float]] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        plots = {
            "queued": sum(plotted(page, "sim", "queue").values()),
            "replicas": plotted(page, "sim", "replicas").get("replicas", 0.0),
        }
        if not seen or plots != seen[-1]:
            seen.append(plots)
        if until(plots):
            break
        page.wait_for_timeout(500)
    return seen


def burst(cluster: Cluster, count: int) -> concurrent.futures.Future[list[tuple[int, str]]]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=count)

    def run() -> list[tuple[int, str]]:
        return list(pool.map(lambda _: cluster.image(), range(count)))

    return pool.submit(run)


@pytest.mark.own_ray_cluster
def test_a_burst_scales_workers_up_then_back_to_min(cluster: Cluster) -> None:
    assert len(cluster.replicas("TextToImage-sim")) == 1
    scheduler_before = cluster.replicas("Scheduler-sim")
    started = time.monotonic()
    # 48 s of work for one replica: it outlasts the start of new replicas (4-6 s for
    # three at once on the project's faster machines, 25-27 s on a slow one), so they
    # take a share of it.
    with chromium() as browser:  # the operations view, watching the burst
        sre = Watched(browser)
        sre.sign_in(f"{cluster.base_url}/ops", cluster.keys["operator"])
        sre.page.wait_for_selector("[data-model='sim'] canvas[data-plot='replicas'][data-latest]")
        results = burst(cluster, 48)
        seen = watch_plots(sre.page, until=lambda plots: plots["replicas"] >= 3, limit_s=75)
        took = wait_for(lambda: len(cluster.replicas("TextToImage-sim")) >= 3, 60, ">= 3 replicas")
        shots = os.environ.get("CONSOLE_SCREENSHOT_DIR")
        if shots:
            sre.page.screenshot(path=f"{shots}/ops-autoscaling.png", full_page=True)
        sre.check_key_handling(cluster.keys["operator"])
    # The plots moved with the burst: the queue rose, and the replicas followed it.
    assert max(plots["queued"] for plots in seen) > 0, seen
    assert [plots["replicas"] for plots in seen][-1] >= 3 > seen[0]["replicas"], seen
    answers = results.result(timeout=120)
    elapsed = time.monotonic() - started
    assert [status for status, _ in answers] == [200] * 48, [a for a in answers if a[0] != 200]
    # Served by the new replicas too, not only by the one that was there (how soon
    # they start depends on the machine: bench_autoscale measures that).
    workers = {worker for _, worker in answers}
    assert len(workers) >= 2, f"one worker served all ({elapsed:.1f}s, 3 after {took:.1f}s)"
    assert len(cluster.replicas("TextToImage-sim")) <= 4  # max_replicas
    wait_for(lambda: len(cluster.replicas("TextToImage-sim")) == 1, 60, "back to min (1)")
    assert cluster.replicas("Scheduler-sim") == scheduler_before  # never restarted

    shown = cluster.cli("scale", "show", "--api-key", cluster.keys["pro"])
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("sim "))
    assert row.split()[1:6] == ["1", "1", "1", "4", "1"], shown.stdout


@pytest.mark.own_ray_cluster
def test_scale_set_under_load_changes_max_without_restarting_replicas(cluster: Cluster) -> None:
    lowered = cluster.cli("scale", "set", "sim", "--max", "2")
    assert lowered.returncode == 0, lowered.stderr
    assert "max_replicas: 4 -> 2" in lowered.stdout
    # 48 s of work for one replica: the queue must outlast two replica starts and three
    # CLI runs (a new Python process each, seconds on a busy machine), or there is no
    # demand left for the third replica.
    results = burst(cluster, 48)
    wait_for(lambda: len(cluster.replicas("TextToImage-sim")) == 2, 60, "2 replicas")
    before = {
        name: cluster.replicas(name) for name in ("TextToImage-sim", "Scheduler-sim", "Router")
    }
    time.sleep(2)
    assert len(cluster.replicas("TextToImage-sim")) == 2  # the max holds under load
    shown = cluster.cli("scale", "show", "--api-key", cluster.keys["pro"])
    row = next(line for line in shown.stdout.splitlines() if line.startswith("sim "))
    queued = re.search(r"pro (\d+)$", row)  # the scheduler's queue, per tier
    assert queued and int(queued.group(1)) > 0, shown.stdout

    raised = cluster.cli("scale", "set", "sim", "--max", "3", "--free-weight", "0.25")
    assert raised.returncode == 0, raised.stderr
    assert (
        "max_replicas: 2 -> 3" in raised.stdout and "queue_weights.0: 0.5 -> 0.25" in raised.stdout
    )
    wait_for(lambda: len(cluster.replicas("TextToImage-sim")) == 3, 60, "3 replicas")
    after = {name: cluster.replicas(name) for name in before}
    # Lightweight update: every replica that ran before still runs, none restarted.
    assert set(before["TextToImage-sim"]) <= set(after["TextToImage-sim"])
    assert after["Scheduler-sim"] == before["Scheduler-sim"]
    assert after["Router"] == before["Router"]
    peak = 3
    while not results.done():
        peak = max(peak, len(cluster.replicas("TextToImage-sim")))
        time.sleep(0.25)
    assert peak == 3, "the new max was not honoured"
    answers = results.result()
    assert [status for status, _ in answers] == [200] * 48, (
        [a for a in answers if a[0] != 200],
        cluster.status(),
    )

    refused = cluster.cli("scale", "set", "sim", "--min", "5")
    assert refused.returncode != 0 and "must not exceed max" in refused.stderr
    audit = [
        json.loads(line) for line in (Path(cluster.env["MEDIAGATE_HOME"]) / "audit.log").open()
    ]
    scale_changes = [e for e in audit if any("autoscaling_config" in c for c in e["changes"])]
    assert [entry["by"] for entry in scale_changes] == ["sre-test", "sre-test"]
    created = [e for e in audit if e["changes"][0].startswith("created key ")]
    assert len(created) == len(cluster.keys)  # the fixture's keys, audited
    assert not any(key in json.dumps(audit) for key in cluster.keys.values())
    shown = cluster.cli("scale", "show")
    assert "sre-test: TextToImage-sim.autoscaling_config.max_replicas: 2 -> 3" in shown.stdout


@pytest.mark.own_ray_cluster
def test_an_operator_key_changes_limits_through_the_api(cluster: Cluster) -> None:
    """``POST /v1/ops/limits``: the router reaches the Serve controller itself, deploys
    the change as a lightweight update and audits it; other keys get 403."""
    created = cluster.cli(
        "keys", "create", "--tier", "pro", "--account", "as-sre", "--role", "operator"
    )
    assert created.returncode == 0, created.stderr
    operator = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}
    user = {"Authorization": f"Bearer {cluster.keys['pro']}"}
    limits = f"{cluster.base_url}/v1/ops/limits"
    refused = httpx.post(limits, json={"model": "sim", "max_replicas": 2}, headers=user)
    assert refused.status_code == 403, refused.text

    status = httpx.get(f"{cluster.base_url}/v1/ops/status", headers=operator, timeout=30).json()
    row = next(row for row in status["scaling"] if row["model"] == "sim")
    assert status["limit_changes_allowed"] and row["replicas"] >= 1, status
    before = {name: cluster.replicas(name) for name in ("Scheduler-sim", "Router")}
    wanted = row["max"] + 1
    changed = httpx.post(
        limits, json={"model": "sim", "max_replicas": wanted}, headers=operator, timeout=60
    )
    assert changed.status_code == 200, changed.text
    line = f"TextToImage-sim.autoscaling_config.max_replicas: {row['max']} -> {wanted}"
    assert changed.json()["changes"] == [line]

    def deployed_max() -> int:
        config = deployments_of(cluster.details())["TextToImage-sim"]["deployment_config"]
        return int(config["autoscaling_config"]["max_replicas"])

    wait_for(lambda: deployed_max() == wanted, 60, f"max_replicas {wanted} deployed")
    assert {name: cluster.replicas(name) for name in before} == before  # none restarted
    assert cluster.image()[0] == 200

    bad = httpx.post(limits, json={"model": "sim", "min_replicas": 99}, headers=operator)
    assert bad.status_code == 400 and "must not exceed max" in bad.json()["error"]["message"]
    assert deployed_max() == wanted
    shown = cluster.cli("scale", "show")
    assert f"as-sre (console): {line}" in shown.stdout, shown.stdout


@pytest.mark.own_ray_cluster
def test_idle_video_goes_to_zero_and_a_job_brings_it_back(cluster: Cluster) -> None:
    wait_for(lambda: cluster.replicas("TextToVideo-simvid") == [], 60, "video at zero")
    created = httpx.post(
        f"{cluster.base_url}/v1/videos",
        json={"prompt": "cold start", "model": "simvid"},
        headers={"Authorization": f"Bearer {cluster.keys['pro']}"},
        timeout=30,
    )
    assert created.status_code == 200, created.text
    video_id = created.json()["id"]

    def completed() -> bool:
        job = httpx.get(
            f"{cluster.base_url}/v1/videos/{video_id}",
            headers={"Authorization": f"Bearer {cluster.keys['pro']}"},
            timeout=10,
        ).json()
        assert job["status"] != "failed", job
        return bool(job["status"] == "completed")

    # A cold start: Serve starts a replica (a process and the simulated model, a few
    # seconds here) and it runs a 0.2 s job; a minute allows for a busy machine.
    wait_for(completed, 60, "the video job to complete after a cold start")
    wait_for(lambda: cluster.replicas("TextToVideo-simvid") == [], 60, "video back at zero")
