"""Priority and fairness through the real path, with the SIMULATED model (it sleeps per
step like a GPU replica, so the two CPU cores are not the bottleneck)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from mediagate.accounts import open_account_store
from mediagate.state import StateConfig
from tests.integration.conftest import RunningService, write_unlimited_tiers

STEP_MS = 100
SERVICE_S = 4 * STEP_MS / 1000  # 4 steps, batch 1


@pytest.fixture(scope="module")
def prio_service(
    serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningService, dict[str, str]]]:
    from ray import serve

    from deployments.app import AppArgs, build_app

    home = tmp_path_factory.mktemp("prio")
    catalog = {
        "default_models": {"text-to-image": "sim"},
        "models": {
            "sim": {
                "task": "text-to-image",
                "source": f"simulated://sim?step_ms={STEP_MS}",
                "num_gpus": 0,
                "defaults": {"size": "64x64", "num_inference_steps": 4},
                "caps": {"max_width": 64, "max_height": 64, "max_steps": 4, "max_n": 1},
                "batching": {"max_batch_size": 1, "batch_wait_s": 0.0},
            }
        },
    }
    (home / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    tiers_file = write_unlimited_tiers(home, keep_queue_caps=True)
    args = AppArgs(
        home=str(home),
        catalog=str(home / "catalog.yaml"),
        tiers_file=str(tiers_file),
        worker_ray_actor_options={"num_cpus": 0, "num_gpus": 0},
    )
    serve.run(build_app(args), name="prio", route_prefix="/prio")
    accounts = open_account_store(StateConfig.embedded(home / "state.db"))
    keys = {
        name: accounts.create_key(accounts.ensure_account(name, tier).id)
        for name, tier in [("pro", "pro"), ("flooder", "free"), ("quiet", "free")]
    }
    service = RunningService(base_url=f"http://127.0.0.1:{serve_port}/prio", home=home, key="")
    yield service, keys
    serve.delete("prio")


def generate(base_url: str, key: str) -> float:
    """Seconds from sending to the image arriving (the request must succeed)."""
    started = time.perf_counter()
    response = httpx.post(
        f"{base_url}/v1/images/generations",
        json={"prompt": "x"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def queued(base_url: str, key: str) -> dict[str, int]:
    status = httpx.get(f"{base_url}/v1/status", headers={"Authorization": f"Bearer {key}"})
    return dict(status.json()["models"]["sim"]["queue_by_tier"])


def wait_for_queue(base_url: str, key: str, tier: str, at_least: int) -> None:
    deadline = time.monotonic() + 30
    while queued(base_url, key).get(tier, 0) < at_least:
        assert time.monotonic() < deadline, queued(base_url, key)
        time.sleep(0.02)


def test_a_pro_request_starts_next_when_free_work_fills_the_queue(
    prio_service: tuple[RunningService, dict[str, str]],
) -> None:
    service, keys = prio_service
    generate(service.base_url, keys["pro"])  # warm: the scheduler measures the service time
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        free = [pool.submit(generate, service.base_url, keys["flooder"]) for _ in range(6)]
        wait_for_queue(service.base_url, keys["pro"], "free", 5)
        pro_s = generate(service.base_url, keys["pro"])
        free_s = [future.result() for future in free]
    # Behind at most the one free request already running, never behind the queued five.
    assert pro_s < 2 * SERVICE_S + 0.5, (pro_s, free_s)
    assert sorted(free_s)[-1] > pro_s + 3 * SERVICE_S


def test_a_free_flood_does_not_starve_another_free_account(
    prio_service: tuple[RunningService, dict[str, str]],
) -> None:
    service, keys = prio_service
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        flood = [pool.submit(generate, service.base_url, keys["flooder"]) for _ in range(8)]
        wait_for_queue(service.base_url, keys["pro"], "free", 7)
        quiet_s = generate(service.base_url, keys["quiet"])
        flood_s = [future.result() for future in flood]
    # One flood request runs and one account (the flooder) is ahead in the rotation:
    # about two service times, not the eight a FIFO would give.
    assert quiet_s < 2 * SERVICE_S + 0.6, (quiet_s, flood_s)
    assert max(flood_s) > quiet_s + 4 * SERVICE_S
