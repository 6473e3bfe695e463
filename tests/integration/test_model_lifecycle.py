"""`mediagate models` on a running `mediagate up` (issue 20): a model added, swapped and
removed while requests stream at it and at another model, which never notices.

Marked `own_ray_cluster`: `mediagate up` starts its own Ray head, so this runs before
the session's shared cluster exists. The latency side (the other model's p99 during a
change against before) is measured by scripts/bench_model_change.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import (
    deployments_of,
    free_port,
    mediagate_up,
    write_tiny_sd_config,
    write_unlimited_tiers,
)

ROOT = Path(__file__).resolve().parents[2]
MEDIAGATE = str(Path(sys.executable).with_name("mediagate"))
SECOND = "tiny-b"
SMOKE_ON_THIS = ("--smoke", "--existing", "--name", "tiny-bench")


@dataclass
class Up:
    env: dict[str, str]
    base_url: str
    dashboard_url: str
    key: str = ""

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        ran = subprocess.run(
            [MEDIAGATE, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        print(f"mediagate {' '.join(args[:3])}: {time.monotonic() - started:.1f}s")
        print("\n".join(line for line in ran.stderr.splitlines() if "[transformers]" not in line))
        return ran

    def details(self) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.dashboard_url}/api/serve/applications/",
            headers={"authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"},
            timeout=30,
        )
        answer.raise_for_status()
        return dict(answer.json())

    def replica_ids(self, *deployments: str) -> dict[str, list[str]]:
        found = deployments_of(self.details())
        return {
            name: sorted(
                replica["replica_id"]
                for replica in found[name]["replicas"]
                if replica["state"] == "RUNNING"
            )
            for name in deployments
        }

    def image(self, model: str) -> httpx.Response:
        return httpx.post(
            f"{self.base_url}/v1/images/generations",
            json={"prompt": "a lighthouse", "model": model, "size": "64x64"},
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=120,
        )


@dataclass
class Stream:
    """Requests one after another at ``model`` on a thread, each answer recorded."""

    up: Up
    model: str
    answers: list[tuple[float, int, str, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Stream:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                answer = self.up.image(self.model)
                status, version = (
                    answer.status_code,
                    answer.headers.get("x-mediagate-model-version", ""),
                )
            except httpx.HTTPError as error:
                status, version = 0, repr(error)
            self.answers.append((sent, status, version, time.monotonic() - sent))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=180)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("models")
    port, dashboard_port, ray_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "MEDIAGATE_HOME": str(home),
        "MEDIAGATE_OPERATOR": "ml-engineer",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # this cluster's, not ~/.ray's
    }
    started = mediagate_up(
        env,
        *(
            "--config",
            str(write_tiny_sd_config(home, write_unlimited_tiers(home))),
            "--port",
            str(port),
        ),
        *("--dashboard-port", str(dashboard_port), "--ray-port", str(ray_port)),
    )
    running = Up(env, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}")
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        created = running.cli("keys", "create", "--tier", "pro", "--account", "engineer")
        assert created.returncode == 0, created.stderr
        running.key = created.stdout.strip().splitlines()[-1]
        yield running
    finally:
        subprocess.run([MEDIAGATE, "down"], env=env, capture_output=True, timeout=120)


FIRST = ("TextToImage-tiny-sd", "Scheduler-tiny-sd")


@pytest.mark.own_ray_cluster
def test_add_swap_and_remove_a_model_while_another_serves(up: Up) -> None:
    first_replicas = up.replica_ids(*FIRST)
    assert up.image("tiny-sd").status_code == 200
    apps_before = set(up.details()["applications"])

    # Refused before anything is deployed, each saying why.
    # One command, every reason (each kind alone: tests/unit/test_model_lifecycle.py).
    refused = up.cli(
        "models", "add", "bad", "--like", "tiny-sd",
        "--source", "/nowhere/weights", "--pipeline-class", "NoSuch",
    )  # fmt: skip
    assert refused.returncode == 1 and "nothing changed" in refused.stderr, refused.stderr
    for reason in ("no model_index.json", "no pipeline class 'NoSuch'", "no node of the cluster"):
        assert reason in refused.stderr, refused.stderr
    assert set(up.details()["applications"]) == apps_before

    # Added while tiny-sd serves a stream: none of its requests fail, none restarts.
    with Stream(up, "tiny-sd") as stream:
        time.sleep(1)
        added = up.cli("models", "add", SECOND, "--like", "tiny-sd", "--gpus", "0")
        time.sleep(1)
    assert added.returncode == 0, added.stderr[-3000:]
    assert stream.answers and {status for _, status, _, _ in stream.answers} == {200}
    assert up.replica_ids(*FIRST) == first_replicas
    answer = up.image(SECOND)
    assert answer.status_code == 200 and answer.headers["x-mediagate-model-version"] == "1"
    listed = up.cli("models", "list")
    assert SECOND in listed.stdout and "RUNNING" in listed.stdout, listed.stdout

    # Swapped under load: every request is answered, each naming the version that made
    # it; afterwards only version 2 serves and version 1's replicas are gone.
    with Stream(up, SECOND) as on_second, Stream(up, "tiny-sd") as on_first:
        time.sleep(1)
        swapped = up.cli("models", "swap", SECOND, "--source", "tiny://stable-diffusion")
        time.sleep(2)
    assert swapped.returncode == 0, swapped.stderr[-3000:]
    statuses = {status for _, status, _, _ in on_second.answers + on_first.answers}
    assert statuses == {200}, [a for a in on_second.answers if a[1] != 200][:5]
    versions = [version for _, _, version, _ in on_second.answers]
    assert set(versions) == {"1", "2"} and versions[-1] == "2", versions
    assert versions == sorted(versions), "a request went back to the old version"
    applications = up.details()["applications"]
    assert f"model-{SECOND}-v2" in applications and f"model-{SECOND}-v1" not in applications
    assert up.replica_ids(*FIRST) == first_replicas

    # Removed: 404 at once, its application gone, tiny-sd untouched.
    removed = up.cli("models", "remove", SECOND)
    assert removed.returncode == 0, removed.stderr[-3000:]
    gone = up.image(SECOND)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert not any(name.startswith(f"model-{SECOND}") for name in up.details()["applications"])
    assert up.image("tiny-sd").status_code == 200
    assert up.replica_ids(*FIRST) == first_replicas
    catalog = yaml.safe_load((Path(up.env["MEDIAGATE_HOME"]) / "models.yaml").read_text())
    assert set(catalog["models"]) == {"tiny-sd"}
    trail = (Path(up.env["MEDIAGATE_HOME"]) / "audit.log").read_text()
    for change in (f"model {SECOND} added", f"model {SECOND} swapped", f"model {SECOND} removed"):
        assert change in trail, trail


@pytest.mark.own_ray_cluster
def test_bench_model_change_runs_on_this_cluster(up: Up) -> None:
    """scripts/bench_model_change.py in its smoke mode (every benchmark runs in the
    suite), on this module's cluster rather than one of its own."""
    ran = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_model_change.py"), *SMOKE_ON_THIS],
        env=up.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["first_model_replicas_unchanged"], result
    assert result["new_model_status"] == 200 and result["p99_ratio_during"] > 0, result
    assert "tiny-bench" not in up.cli("models", "list").stdout  # removed again
