"""Every benchmark script still runs: each in its few-second smoke mode, on its own local
Ray instance (a subprocess, before the session's shared cluster exists), printing its
result as one JSON object on its last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_smoke(script: str, *options: str) -> dict[str, Any]:
    ran = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--smoke", *options],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


@pytest.mark.own_ray_cluster
def test_bench_overhead_runs_with_quotas_off() -> None:
    result = run_smoke("bench_overhead.py")
    for ratio in ("p50_ratio", "p99_ratio", "throughput_ratio_b1", "throughput_ratio_b2"):
        assert result[ratio] > 0, result
    # The hop-by-hop split, from the answers' Server-Timing (the default ingress: HAProxy).
    assert result["ingress"] == "haproxy"
    split = result["served_split_p50_ms"]
    for stage in ("router", "to_scheduler", "queue", "dispatch", "pipeline", "encode", "ingress"):
        assert stage in split, result
    assert split["pipeline"] > 0, result


@pytest.mark.own_ray_cluster
def test_bench_overload_runs() -> None:
    result = run_smoke("bench_overload.py", "--without-checks")
    assert result["checks"] == "off", result
    assert "moderate" not in result["pro_tail_split_ms"], result
    assert result["capacity_rps"] > 0 and result["pro_success_rate"] > 0, result
    assert result["free_requests"] > 0 and result["other_statuses"] == [], result
    assert result["ingress"] == "haproxy", result


@pytest.mark.own_ray_cluster
def test_bench_overload_runs_the_real_tiny_pipeline_step_by_step() -> None:
    result = run_smoke("bench_overload.py", "--model", "tiny-sd", "--stepping")
    assert result["serving"] == "step-level" and result["model"].startswith("tiny-sd"), result
    assert result["capacity_rps"] > 0 and result["pro_success_rate"] > 0, result
    assert result["other_statuses"] == [], result
    assert result["step_level"]["first_step_wait_s_by_tier"]["pro"]["p99"] >= 0, result


@pytest.mark.own_ray_cluster
def test_bench_autoscale_runs() -> None:
    result = run_smoke("bench_autoscale.py")
    assert result["scale_down_ratio"] > 0, result


def test_bench_step_join_runs() -> None:
    result = run_smoke("bench_step_join.py")
    for model in ("tiny-sd", "sim"):
        figures = result[model]
        assert figures["mean_step_ms"] > 0 and figures["p99_over_step"] > 0, result
        assert figures["free_requests_served"] > 0, result  # the worker was kept busy


def test_bench_ledger_runs() -> None:
    result = run_smoke("bench_ledger.py")
    figures = result["sqlite"]
    assert figures["reserve_ms_first"] > 0 and figures["ratio_last_to_first"] > 0, result


@pytest.mark.own_ray_cluster
def test_bench_hops_runs() -> None:
    result = run_smoke("bench_hops.py")
    assert result["ingress"] == "haproxy", result
    trips = result["handle_round_trips_p50_ms"]
    assert trips["1_hop"] > 0 and trips["2_hops"] > 0, result
    assert result["floor_two_hops_p50_ms"] > result["ingress_p50_ms"] > 0, result


@pytest.mark.own_ray_cluster
def test_soak_runs() -> None:
    result = run_smoke("soak.py")
    assert result["server_errors"] == {}, result
    requests = result["requests"]
    for kind in ("image 200", "image 429", "bad 400", "bad 401", "video 200", "download 200"):
        assert requests.get(kind, 0) > 0, (kind, requests)
    assert set(result["rss_growth_last_window_pct"]) == {
        "Router",
        "Scheduler-tiny-sd",
        "Scheduler-tiny-wan",
        "TextToImage-tiny-sd",
        "TextToVideo-tiny-wan",
    }, result
    assert result["state_rows_or_keys"]["end"] > 0 and result["artifact_files"]["max"] > 0
    assert result["pro_p99_first_ms"] > 0 and result["replicas_restarted"] == [], result


def test_bench_edits_runs() -> None:
    result = run_smoke("bench_edits.py")
    memory = result["memory"]
    assert memory["tasks_with_edits"] == ["image-to-image", "inpaint", "text-to-image"], result
    assert memory["weight_ratio"] == 1.0, result  # every weight shared
    assert all(kind["p50_ms"] > 0 for kind in result["refusals"].values()), result


def test_bench_safety_runs() -> None:
    result = run_smoke("bench_safety.py")
    assert result["signing"]["png_64"]["bytes_added"] > 0, result
    assert result["moderation"]["nudenet_64"]["p50_ms"] > 0, result
    assert result["share_of_tiny_sd_request"]["both"] > 0, result
    assert result["image_process_hand_over"]["process_1024"]["p50_ms"] > 0, result


@pytest.mark.own_ray_cluster
def test_bench_cold_start_runs() -> None:
    result = run_smoke("bench_cold_start.py")
    figures = result["models"]["tiny-sd"]
    assert figures["remote_s"] > 0 and figures["disk_s"] > 0 and figures["files"] > 0, result
    assert figures["memory_s"] > 0 and figures["load_only_memory_s"] > 0, result


@pytest.mark.own_ray_cluster
def test_bench_model_change_runs_on_emulated_gpu_nodes() -> None:
    """The --gpu-nodes mode: its own three-node Ray (a head, two fake GPU nodes pinned to
    cores) under `mediagate up --address`."""
    result = run_smoke("bench_model_change.py", "--gpu-nodes")
    assert result["gpu_nodes"] and result["errors"] == 0, result
    assert result["first_model_replicas_unchanged"] and result["new_model_status"] == 200, result
