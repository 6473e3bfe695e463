"""A real Prometheus (Debian's package) scrapes a service `mediagate up` started, with the
shipped scrape config (deploy/prometheus/prometheus.yml: Ray's service discovery
file); after some traffic, every query of the shipped mediagate Grafana dashboard
(deploy/grafana/mediagate.json) returns series with the labels its legends use, and
the Serve metrics Ray's generated dashboards are built on are there too.

Marked `own_ray_cluster`: it starts its own Ray head (with the dashboard, which writes
the discovery file) before the session's shared cluster exists. Simulated models
(sleeps per step): one batched image model, one step-level image model, one video model.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import free_port, mediagate_up, write_up_config

ROOT = Path(__file__).resolve().parents[2]
MEDIAGATE = str(Path(sys.executable).with_name("mediagate"))
SCRAPE_S = 1
# Serve metrics that traffic like this test's must produce, among those Ray's Serve
# dashboards query (gRPC, multiplexing and errors-only metrics stay empty here).
SERVE_METRICS = (
    "ray_serve_num_http_requests_total",
    "ray_serve_http_request_latency_ms_bucket",
    "ray_serve_deployment_request_counter_total",
    "ray_serve_deployment_processing_latency_ms_bucket",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_replica_processing_queries",
)


@dataclass
class Monitored:
    base_url: str
    prometheus_url: str
    keys: dict[str, str]
    metrics_port: int
    session_dir: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr})
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])


def write_config(home: Path) -> Path:
    step = {"num_gpus": 0, "defaults": {"size": "64x64", "num_inference_steps": 5}}
    caps = {"max_width": 64, "max_height": 64, "max_steps": 5, "max_n": 2}
    catalog = {
        "default_models": {"text-to-image": "sim", "text-to-video": "simvid"},
        "models": {
            "sim": {
                "task": "text-to-image",
                "description": "SIMULATED batched image model",
                "source": "simulated://sim?step_ms=40",
                **step,
                "caps": caps,
                "batching": {"max_batch_size": 4, "batch_wait_s": 0.05},
            },
            "simstep": {
                "task": "text-to-image",
                "description": "SIMULATED step-level image model",
                "source": "simulated://simstep?step_ms=40",
                **step,
                "caps": caps,
                "stepping": {"seats_per_replica": 4},
            },
            "simvid": {
                "task": "text-to-video",
                "description": "SIMULATED video model",
                "source": "simulated://simvid?step_ms=40",
                "num_gpus": 0,
                "defaults": {"size": "64x64", "num_inference_steps": 4},
                "caps": {"max_width": 64, "max_height": 64, "max_steps": 4, "max_n": 1},
                "video": {"fps": 8, "allowed_seconds": [4], "default_seconds": 4},
            },
        },
    }
    (home / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    workers = {"num_cpus": 0, "num_gpus": 0}
    return write_up_config(
        home / "serve.metrics.yaml",
        {"catalog": str(home / "catalog.yaml")},
        [
            {"name": f"TextToImage-{model}", "ray_actor_options": workers}
            for model in ("sim", "simstep")
        ]
        + [{"name": "TextToVideo-simvid", "ray_actor_options": workers}],
    )


def prometheus_config(home: Path, session_dir: str) -> Path:
    """The shipped scrape config, reading the discovery file of this test's Ray (its
    own session, not /tmp/ray's latest), scraping every second."""
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_S}s"
    [job] = config["scrape_configs"]
    discovery = Path(session_dir) / "prom_metrics_service_discovery.json"
    job["file_sd_configs"][0]["files"] = [str(discovery)]
    job["file_sd_configs"][0]["refresh_interval"] = "1s"
    path = home / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    assert shutil.which("prometheus"), "prometheus is missing: scripts/test.sh installs it"
    home = tmp_path_factory.mktemp("metrics")
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "MEDIAGATE_HOME": str(home), "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    up = mediagate_up(
        env,
        *("--config", str(write_config(home)), "--port", str(port)),
        *("--dashboard-port", str(free_port()), "--ray-port", str(free_port())),
        *("--metrics-port", str(metrics_port)),
    )
    prometheus = None
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics" in up.stderr
        run = json.loads((home / "run.json").read_text())
        keys = {}
        for tier in ("pro", "free"):
            created = subprocess.run(
                [MEDIAGATE, "keys", "create", "--tier", tier, "--account", f"metrics-{tier}"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            keys[tier] = created.stdout.strip().splitlines()[-1]
        prometheus_port = free_port()
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={prometheus_config(home, run['ray_session_dir'])}",
                f"--storage.tsdb.path={home / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(home / "prometheus.log").open("w"),
        )
        yield Monitored(
            base_url=f"http://127.0.0.1:{port}",
            prometheus_url=f"http://127.0.0.1:{prometheus_port}",
            keys=keys,
            metrics_port=metrics_port,
            session_dir=run["ray_session_dir"],
        )
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        subprocess.run([MEDIAGATE, "down"], env=env, capture_output=True, timeout=300)


def traffic(service: Monitored) -> None:
    """Batched and step-level images, a free account past its quota, one video job."""
    pro = {"Authorization": f"Bearer {service.keys['pro']}"}
    free = {"Authorization": f"Bearer {service.keys['free']}"}
    with httpx.Client(base_url=service.base_url, timeout=120) as http:

        def image(model: str) -> int:
            body = {"model": model, "prompt": "metrics", "n": 2}
            return http.post("/v1/images/generations", json=body, headers=pro).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(image, ["sim", "simstep"] * 8))
        assert statuses == [200] * 16, statuses
        refused = [
            http.post("/v1/images/generations", json={"prompt": "x"}, headers=free).status_code
            for _ in range(4)
        ]
        assert refused == [200, 200, 200, 429], refused
        job = http.post("/v1/videos", json={"prompt": "waves", "seconds": "4"}, headers=pro)
        assert job.status_code == 200, job.text
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = http.get(f"/v1/videos/{job.json()['id']}", headers=pro).json()["status"]
            if status in ("completed", "failed"):
                break
            time.sleep(0.5)
        assert status == "completed"


def dashboard_queries(path: Path) -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) of every target of a dashboard."""
    dashboard = json.loads(path.read_text())
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def concrete(expr: str) -> str:
    """A panel query as Grafana would send it here: every model, a 1-minute rate."""
    return expr.replace("$model", ".*").replace("$__rate_interval", "1m")


@pytest.mark.own_ray_cluster
def test_every_dashboard_query_has_series_with_its_labels(monitored: Monitored) -> None:
    import psutil

    listeners = {
        connection.laddr.ip
        for connection in psutil.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN
        and connection.laddr.port == monitored.metrics_port
    }
    assert listeners == {"127.0.0.1"}, listeners  # Ray's metrics endpoint: loopback only

    traffic(monitored)
    queries = dashboard_queries(ROOT / "deploy/grafana/mediagate.json")
    assert len(queries) >= 10
    empty: list[str] = []
    deadline = time.monotonic() + 90  # a few scrapes after the traffic, and rates settle
    while True:
        empty = []
        for title, expr, legend in queries:
            series = monitored.query(concrete(expr))
            if not series:
                empty.append(f"{title}: {expr}")
                continue
            for label in re.findall(r"\{\{(\w+)\}\}", legend):
                missing = [s["metric"] for s in series if label not in s["metric"]]
                assert not missing, (title, label, missing[:3])
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert not empty, "panels with no data:\n" + "\n".join(empty)

    refusals = monitored.query('ray_mediagate_refusals_total{tier="free"}')
    assert {s["metric"]["reason"] for s in refusals} == {"insufficient_quota"}, refusals
    finished = monitored.query("ray_mediagate_video_jobs_finished_total")
    assert [(s["metric"]["status"], s["value"][1]) for s in finished] == [("completed", "1")]

    names = set(
        httpx.get(f"{monitored.prometheus_url}/api/v1/label/__name__/values").json()["data"]
    )
    serve_dashboards = " ".join(
        expr
        for name in ("ray_serve.json", "ray_serve_deployment.json")
        for _, expr, _ in dashboard_queries(ROOT / "deploy/grafana" / name)
    )
    for metric in SERVE_METRICS:
        assert metric in serve_dashboards, metric  # still what Ray's dashboards query
        assert metric in names, metric
