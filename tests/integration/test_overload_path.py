"""Preemption, shedding and their refunds through the real path: HTTP -> Serve proxy ->
router -> scheduler -> a real worker replica running the SIMULATED model (it sleeps per
denoising step like a GPU replica and honours the pipeline's interrupt flag)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mediagate.access.accounts import Account, open_account_store
from mediagate.access.ledger import QuotaLedger
from mediagate.access.tiers import load_tier_policy
from mediagate.stores import StateConfig, open_state_store
from tests.integration.conftest import RunningService, write_unlimited_tiers

STEP_MS = 100
LONG_STEPS = 30  # the free batch that gets preempted: 3 s
SHORT_STEPS = 10  # the pro request that preempts it: 1 s


def simulated_catalog(step_ms: int, max_steps: int) -> dict[str, Any]:
    return {
        "default_models": {"text-to-image": "sim"},
        "models": {
            "sim": {
                "task": "text-to-image",
                "source": f"simulated://sim?step_ms={step_ms}",
                "num_gpus": 0,
                "defaults": {"size": "64x64", "num_inference_steps": 4},
                "caps": {"max_width": 64, "max_height": 64, "max_steps": max_steps, "max_n": 1},
                "batching": {"max_batch_size": 1, "batch_wait_s": 0.0},
                "scaling": {"min_replicas": 1, "max_replicas": 1},
            }
        },
    }


def deploy(name: str, home: Path, catalog: dict[str, Any], tiers_file: Path, port: int) -> str:
    from ray import serve

    from deployments.app import AppArgs, build_app

    (home / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    args = AppArgs(
        home=str(home),
        catalog=str(home / "catalog.yaml"),
        tiers_file=str(tiers_file),
        worker_ray_actor_options={"num_cpus": 0, "num_gpus": 0},
    )
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}"


def post_image(base_url: str, key: str, steps: int, timeout_s: float = 60) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/images/generations",
        json={"prompt": "x", "num_inference_steps": steps},
        headers={"Authorization": f"Bearer {key}"},
        timeout=timeout_s,
    )


def sim_status(base_url: str, key: str) -> dict[str, Any]:
    answer = httpx.get(f"{base_url}/v1/status", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["models"]["sim"])


def wait_until(condition: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def preempt_service(
    serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningService, dict[str, str]]]:
    from ray import serve

    home = tmp_path_factory.mktemp("preempt")
    base_url = deploy(
        "preempt",
        home,
        simulated_catalog(STEP_MS, LONG_STEPS),
        write_unlimited_tiers(home, keep_queue_caps=True),
        serve_port,
    )
    accounts = open_account_store(StateConfig.embedded(home / "state.db"))
    keys = {
        tier: accounts.create_key(accounts.ensure_account(tier, tier).id)
        for tier in ("free", "pro")
    }
    yield RunningService(base_url=base_url, home=home, key=keys["pro"]), keys
    serve.delete("preempt")


def test_pro_work_preempts_a_running_free_batch_on_a_real_replica(
    preempt_service: tuple[RunningService, dict[str, str]],
) -> None:
    service, keys = preempt_service
    base_url = service.base_url
    # The scheduler preempts only a batch whose expected time it has measured.
    for steps in (LONG_STEPS, SHORT_STEPS):
        assert post_image(base_url, keys["pro"], steps).status_code == 200
    before = sim_status(base_url, keys["pro"]).get("preempted", {}).get("free", 0)
    finished: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:

        def run(tier: str, steps: int) -> tuple[httpx.Response, float]:
            started = time.monotonic()
            response = post_image(base_url, keys[tier], steps)
            finished.append(tier)
            return response, time.monotonic() - started

        free = pool.submit(run, "free", LONG_STEPS)
        wait_until(
            lambda: sim_status(base_url, keys["pro"])["running_by_tier"].get("free") == 1,
            "the free batch to run",
        )
        pro_response, pro_s = run("pro", SHORT_STEPS)
        free_response, free_s = free.result()
    assert pro_response.status_code == 200, pro_response.text
    assert free_response.status_code == 200, free_response.text  # preempted, then run again
    assert finished == ["pro", "free"]
    after = sim_status(base_url, keys["pro"])["preempted"].get("free", 0)
    assert after == before + 1
    # One step to stop the free batch (0.1 s) plus its own 1 s; without preemption it would
    # first wait out the free batch's remaining ~2.8 s. The slack is for a busy machine.
    assert pro_s < SHORT_STEPS * STEP_MS / 1000 + 1.5, pro_s
    # The free request ran its 3 s again after the pro one.
    assert free_s > pro_s + LONG_STEPS * STEP_MS / 1000 * 0.9, (free_s, pro_s)


SHED_STEP_MS = 200  # 4 steps: 0.8 s per request
FREE_MAX_QUEUED = 3
FREE_MAX_WAIT_S = 1.0


@pytest.fixture(scope="module")
def shed_service(
    serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningService, Path, dict[str, str]]]:
    """A free tier with a real daily quota, a small queue cap and a 1 s longest wait."""
    from ray import serve

    home = tmp_path_factory.mktemp("shed")
    tiers = yaml.safe_load(write_unlimited_tiers(home, keep_queue_caps=True).read_text())
    tiers["tiers"]["free"].update(
        images_per_day=50, max_queued=FREE_MAX_QUEUED, max_queue_wait_s=FREE_MAX_WAIT_S
    )
    tiers_file = home / "tiers-shed.yaml"
    tiers_file.write_text(yaml.safe_dump(tiers))
    base_url = deploy("shed", home, simulated_catalog(SHED_STEP_MS, 4), tiers_file, serve_port)
    accounts = open_account_store(StateConfig.embedded(home / "state.db"))
    keys = {
        name: accounts.create_key(accounts.ensure_account(name, tier).id)
        for name, tier in [
            ("free-a", "free"),
            ("free-b", "free"),
            ("free-c", "free"),
            ("pro", "pro"),
        ]
    }
    yield RunningService(base_url=base_url, home=home, key=keys["pro"]), tiers_file, keys
    serve.delete("shed")


def images_charged(home: Path, tiers_file: Path, name: str) -> int:
    """What the ledger holds against ``name`` today (reserved or committed)."""
    store = open_state_store(StateConfig.embedded(home / "state.db"))
    account = open_account_store(StateConfig.embedded(home / "state.db")).get_account(name)
    assert isinstance(account, Account)
    ledger = QuotaLedger(store, load_tier_policy(tiers_file))
    return asyncio.run(ledger.usage(account)).images_today


def test_shed_expired_and_abandoned_free_work_costs_nothing(
    shed_service: tuple[RunningService, Path, dict[str, str]],
) -> None:
    service, tiers_file, keys = shed_service
    base_url = service.base_url
    # A flood before any service time is measured: the queue cap sheds at once, the
    # scheduler admits the rest (nothing to estimate from yet) and what then waits past
    # the tier's 1 s expires in the queue.
    accounts = ["free-a", "free-b"] * 4
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(accounts)) as pool:
        answers = list(pool.map(lambda name: (name, post_image(base_url, keys[name], 4)), accounts))
    served = {name: 0 for name in ("free-a", "free-b")}
    refusals = []
    for name, response in answers:
        if response.status_code == 200:
            served[name] += 1
            continue
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "server_overloaded"
        assert int(response.headers["retry-after"]) >= 1
        refusals.append(response)
    counts = sim_status(base_url, keys["pro"])
    assert sum(served.values()) >= 1 and len(refusals) >= len(accounts) - FREE_MAX_QUEUED - 1
    assert counts["shed"].get("free", 0) >= 1, counts
    assert counts["expired"].get("free", 0) >= 1, counts
    assert counts["shed"].get("free", 0) + counts["expired"].get("free", 0) == len(refusals)

    # A caller who leaves while queued (behind a running request) is not charged either.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(post_image, base_url, keys["free-a"], 4)
        wait_until(
            lambda: sim_status(base_url, keys["pro"])["running_by_tier"].get("free") == 1,
            "a free request to run",
        )
        try:
            early = post_image(base_url, keys["free-b"], 4, timeout_s=0.3)
        except httpx.TimeoutException:
            pass  # it left while queued
        else:  # refused at once (the estimate saw no room): a refusal costs nothing too
            assert early.status_code == 503, early.text
        assert running.result().status_code == 200
    served["free-a"] += 1

    for name, count in served.items():  # releases may land just after the answers
        wait_until(
            lambda name=name, count=count: images_charged(service.home, tiers_file, name) == count,
            f"{name} to be charged exactly its {count} delivered images",
            timeout_s=10,
        )


def test_one_request_id_per_answer_through_serve(
    preempt_service: tuple[RunningService, dict[str, str]],
) -> None:
    """Serve's ingress gives each request an id and echoes it; the router adopts that one
    instead of adding a second header of its own."""
    service, keys = preempt_service
    auth = {"Authorization": f"Bearer {keys['pro']}"}
    ok = httpx.get(f"{service.base_url}/v1/models", headers=auth)
    bad = httpx.post(f"{service.base_url}/v1/images/generations", json={"n": 1}, headers=auth)
    given = httpx.get(
        f"{service.base_url}/v1/models", headers={**auth, "x-request-id": "client-trace-7"}
    )
    assert (ok.status_code, bad.status_code, given.status_code) == (200, 400, 200)
    for answer in (ok, bad, given):
        assert len(answer.headers.get_list("x-request-id")) == 1, answer.headers
    assert given.headers["x-request-id"] == "client-trace-7"


def test_refused_demand_reaches_the_autoscaler_through_real_handles(
    shed_service: tuple[RunningService, Path, dict[str, str]],
) -> None:
    """Free work refused at admission is demand the autoscaler sees (weighed like the
    tier's queue): the scheduler's own sheds, and what a router refused early, sent as
    plain data with its read of the scheduler's load."""
    from ray import serve

    service, _, keys = shed_service
    scheduler = serve.get_deployment_handle("Scheduler-sim", app_name="shed")

    def stats() -> dict[str, float]:
        return dict(scheduler.record_autoscaling_stats.remote().result(timeout_s=10))

    # A service time is measured first: refused work counts the slot time it would take
    # (an account of its own: one counts once a minute).
    assert post_image(service.base_url, keys["pro"], 4).status_code == 200
    before = stats()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(lambda _: post_image(service.base_url, keys["free-c"], 4), range(8))
        )
    assert any(answer.status_code == 503 for answer in answers), [a.status_code for a in answers]
    flooded = stats()
    assert flooded["turned_away_class_0"] > before.get("turned_away_class_0", 0.0), flooded
    assert flooded["weighted_turned_away"] == pytest.approx(0.5 * flooded["turned_away_class_0"])

    # A router's early refusals: 30 slot-seconds in the last minute are half a slot.
    scheduler.published_load.remote({0: 30.0}).result(timeout_s=10)
    routed = stats()
    added = routed["turned_away_class_0"] - flooded["turned_away_class_0"]
    assert added == pytest.approx(0.5, abs=0.05), (flooded, routed)
