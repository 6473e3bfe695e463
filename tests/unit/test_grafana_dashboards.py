"""The Grafana dashboards in deploy/grafana/ are what scripts/grafana_dashboards.py
makes (mediagate's from its panel data, Ray's from Ray's own factory) and carry what
Grafana's import needs. Their queries run against a real Prometheus in
tests/integration/test_prometheus.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
FILES = ("mediagate.json", "ray_serve.json", "ray_serve_deployment.json")


def load(name: str) -> dict[str, Any]:
    return dict(json.loads((GRAFANA / name).read_text()))


def test_the_committed_dashboards_are_what_the_script_makes() -> None:
    checked = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "grafana_dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("name", FILES)
def test_each_dashboard_has_what_grafana_import_needs(name: str) -> None:
    dashboard = load(name)
    for field in ("uid", "title", "panels", "schemaVersion", "templating", "time"):
        assert field in dashboard, field
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert "datasource" in variables
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard["panels"]:
        assert {"type", "title", "gridPos"} <= set(panel), panel.get("title")
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel.get("targets", []):
            assert target["expr"].strip() and target.get("refId"), panel["title"]
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, (panel["title"], used - variables)


def test_mediagate_dashboard_covers_the_operators_questions() -> None:
    queries = " ".join(
        target["expr"] for panel in load("mediagate.json")["panels"] for target in panel["targets"]
    )
    for metric in (
        "ray_mediagate_queue_length",  # queue per model and tier
        "ray_mediagate_scheduler_decisions_total",  # admitted / shed / expired rates
        "ray_mediagate_wait_beyond_estimate_seconds",  # wait-estimate error
        "ray_serve_deployment_replica_healthy",  # replicas ...
        "ray_serve_autoscaling_target_replicas",  # ... against the target
        "ray_mediagate_batch_images",  # batch occupancy
        "ray_mediagate_denoising_images_stepped_total",  # step occupancy
        "ray_mediagate_refusals_total",  # refusals per tier and reason
        "ray_mediagate_video_jobs_finished_total",  # video job states
    ):
        assert metric in queries, metric


def test_rays_dashboards_come_from_rays_factory() -> None:
    assert load("ray_serve.json")["uid"] == "rayServeDashboard"
    assert load("ray_serve_deployment.json")["uid"] == "rayServeDeploymentDashboard"
