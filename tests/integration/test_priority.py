"""Priority and fairness through the real path, with the SIMULATED model (it sleeps per
step like a GPU replica, so the two CPU cores are not the bottleneck)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from mediagate.access.accounts import open_account_store
from mediagate.stores import StateConfig
from tests.integration.conftest import RunningService, write_unlimited_tiers

STEP_MS = 200
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
    # These tests count who is served first, not who is shed: a wait estimate inflated by
    # a busy machine (a request measured at 2 s instead of 0.8 s) must not turn the flood
    # into 503s, as free's 30 s limit would.
    tiers = yaml.safe_load(tiers_file.read_text())
    for tier in tiers["tiers"].values():
        tier["max_queue_wait_s"] = 600
    tiers_file.write_text(yaml.safe_dump(tiers))
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
    """When the image arrived (``time.monotonic()``; the request must succeed)."""
    response = httpx.post(
        f"{base_url}/v1/images/generations",
        json={"prompt": "x"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return time.monotonic()


def queued(base_url: str, key: str) -> dict[str, int]:
    status = httpx.get(f"{base_url}/v1/status", headers={"Authorization": f"Bearer {key}"})
    return dict(status.json()["models"]["sim"]["queue_by_tier"])


def wait_for_queue(base_url: str, key: str, tier: str, at_least: int) -> None:
    deadline = time.monotonic() + 30
    while queued(base_url, key).get(tier, 0) < at_least:
        assert time.monotonic() < deadline, queued(base_url, key)
        time.sleep(0.02)


# One worker slot serves one request at a time, SERVICE_S each, so requests finish
# SERVICE_S apart and the order they finish in is the order they were served: the
# tests count, they do not time. A request sent while QUEUED_FIRST or more free ones
# wait is served right after the running one (or one more, by rotation); FIFO would
# serve it after all of them. Waiting for QUEUED_FIRST queued (not all FLOOD) leaves the
# flood's requests FLOOD - QUEUED_FIRST service times (2.4 s) to arrive, which a busy
# 2-core machine needs. Of the flood, at most FLOOD - QUEUED_FIRST had started then, two
# more may start while the request's own HTTP call arrives (1.6 s), and one more by
# rotation: at least QUEUED_FIRST - 3 finish after it (FIFO: none).
FLOOD = 12
QUEUED_FIRST = 9
AFTER_AT_LEAST = QUEUED_FIRST - 3


def test_a_pro_request_starts_next_when_free_work_fills_the_queue(
    prio_service: tuple[RunningService, dict[str, str]],
) -> None:
    service, keys = prio_service
    generate(service.base_url, keys["pro"])  # warm: the scheduler measures the service time
    with concurrent.futures.ThreadPoolExecutor(max_workers=FLOOD + 2) as pool:
        free = [pool.submit(generate, service.base_url, keys["flooder"]) for _ in range(FLOOD)]
        wait_for_queue(service.base_url, keys["pro"], "free", QUEUED_FIRST)
        pro_at = generate(service.base_url, keys["pro"])
        free_at = [future.result() for future in free]
    # Behind the free request already running, not behind the queued ones.
    after_pro = sum(1 for at in free_at if at > pro_at)
    assert after_pro >= AFTER_AT_LEAST, (after_pro, sorted(at - pro_at for at in free_at))


def test_a_free_flood_does_not_starve_another_free_account(
    prio_service: tuple[RunningService, dict[str, str]],
) -> None:
    service, keys = prio_service
    with concurrent.futures.ThreadPoolExecutor(max_workers=FLOOD + 2) as pool:
        flood = [pool.submit(generate, service.base_url, keys["flooder"]) for _ in range(FLOOD)]
        wait_for_queue(service.base_url, keys["pro"], "free", QUEUED_FIRST)
        quiet_at = generate(service.base_url, keys["quiet"])
        flood_at = [future.result() for future in flood]
    # One flood request runs and one account (the flooder) is ahead in the rotation:
    # served second or third, not after the whole flood as FIFO would.
    after_quiet = sum(1 for at in flood_at if at > quiet_at)
    assert after_quiet >= AFTER_AT_LEAST, (after_quiet, sorted(at - quiet_at for at in flood_at))
