"""Tiers at the HTTP edge, on both backends: exact quotas under concurrency, refunds,
gates, caps and headers. The router app runs in-process with a fake scheduler."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from mediagate.access.accounts import open_account_store
from mediagate.protocol.errors import GenerationFailed
from mediagate.stores import StateConfig, open_state_store
from tests.unit.harness import Service

RACES = 20
CONCURRENT = 200


@pytest.fixture
def backend(state_config: StateConfig) -> StateConfig:
    return state_config


def make_service(tmp_path: Path, config: StateConfig, **kwargs: Any) -> Service:
    return Service(
        tmp_path,
        jobs=open_state_store(config),
        accounts=open_account_store(config),
        **kwargs,
    )


async def ledger_images(service: Service, account_name: str) -> int:
    account = service.accounts.get_account(account_name)
    assert account is not None
    return (await service.gateway.guard.ledger.usage(account)).images_today


def client_of(service: Service) -> httpx.AsyncClient:
    """The app on this test's event loop (the Redis clients belong to one loop)."""
    transport = httpx.ASGITransport(app=service.client.app)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def post(service: Service, path: str, body: dict[str, Any], auth: dict[str, str]) -> Any:
    async with client_of(service) as client:
        return await client.post(path, json=body, headers=auth)


async def race(service: Service, auth: dict[str, str]) -> list[httpx.Response]:
    async with client_of(service) as client:
        return await asyncio.gather(
            *(
                client.post("/v1/images/generations", json={"prompt": "x"}, headers=auth)
                for _ in range(CONCURRENT)
            )
        )


async def test_200_concurrent_requests_from_one_free_key(
    tmp_path: Path, backend: StateConfig
) -> None:
    service = make_service(tmp_path, backend)
    over_admissions = 0
    for index in range(RACES):
        name = f"free-{index}"
        responses = await race(service, service.other_auth(name, "free"))
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 429]
        over_admissions += max(0, len(ok) - 3)
        assert len(ok) == 3 and len(refused) == CONCURRENT - 3, {
            r.text for r in responses if r.status_code not in (200, 429)
        }
        for response in refused:
            assert response.json()["error"]["code"] == "insufficient_quota"
            assert response.json()["error"]["type"] == "insufficient_quota"
            assert int(response.headers["retry-after"]) > 0
            assert response.headers["x-should-retry"] == "false"
        assert await ledger_images(service, name) == 3
    assert over_admissions == 0
    assert len(service.scheduler.jobs) == 3 * RACES  # nothing refused reached the scheduler


async def test_success_carries_rate_limit_headers(tmp_path: Path, backend: StateConfig) -> None:
    service = make_service(tmp_path, backend)
    auth = service.other_auth("plus-user", "plus", age_days=30)
    first = await post(service, "/v1/images/generations", {"prompt": "x", "n": 2}, auth)
    assert first.status_code == 200, first.text
    headers = first.headers
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "8"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert headers["x-ratelimit-limit-images"] == "200"
    assert headers["x-ratelimit-remaining-images"] == "198"
    assert headers["x-ratelimit-reset-images"].endswith("s")


async def test_a_failed_generation_costs_no_quota(tmp_path: Path, backend: StateConfig) -> None:
    service = make_service(tmp_path, backend)
    auth = service.other_auth("unlucky", "free")
    service.scheduler.fail_with = GenerationFailed("the model broke")
    for _ in range(5):
        response = await post(service, "/v1/images/generations", {"prompt": "x"}, auth)
        assert response.status_code == 500
    assert await ledger_images(service, "unlucky") == 0
    service.scheduler.fail_with = None
    for _ in range(3):
        ok = await post(service, "/v1/images/generations", {"prompt": "x"}, auth)
        assert ok.status_code == 200
    assert await ledger_images(service, "unlucky") == 3


async def test_per_minute_rate_is_429_with_retry_headers(
    tmp_path: Path, backend: StateConfig
) -> None:
    service = make_service(tmp_path, backend)
    auth = service.other_auth("busy", "plus", age_days=30)
    for _ in range(2):
        body = {"prompt": "x", "n": 4}
        assert (await post(service, "/v1/images/generations", body, auth)).status_code == 200
    refused = await post(service, "/v1/images/generations", {"prompt": "x", "n": 4}, auth)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) == 60
    assert 59_000 <= int(refused.headers["retry-after-ms"]) <= 60_000
    service.clock.advance(60)
    ok = await post(service, "/v1/images/generations", {"prompt": "x", "n": 4}, auth)
    assert ok.status_code == 200


async def test_cooldown_after_a_burst(tmp_path: Path, backend: StateConfig) -> None:
    service = make_service(tmp_path, backend)
    auth = service.other_auth("burst", "plus", age_days=30)
    for _ in range(5):  # 20 images, 4 per request, a minute apart (under the per-minute rate)
        response = await post(service, "/v1/images/generations", {"prompt": "x", "n": 4}, auth)
        assert response.status_code == 200, response.text
        service.clock.advance(61)
    service.clock.advance(-61 + 1)
    refused = await post(service, "/v1/images/generations", {"prompt": "x"}, auth)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "cooldown"
    wait_s = int(refused.headers["retry-after"])
    assert 5 * 60 - 70 <= wait_s <= 5 * 60
    service.clock.advance(wait_s)
    ok = await post(service, "/v1/images/generations", {"prompt": "x"}, auth)
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("tier", "age_days", "status", "code"),
    [
        ("free", 30, 403, "tier_not_allowed"),
        ("plus", 0, 403, "account_too_new"),
        ("plus", 6.9, 403, "account_too_new"),
        ("plus", 8, 200, None),
        ("pro", 0, 200, None),
    ],
)
async def test_video_gates(
    tmp_path: Path,
    backend: StateConfig,
    tier: str,
    age_days: float,
    status: int,
    code: str | None,
) -> None:
    service = make_service(tmp_path, backend)
    auth = service.other_auth(f"{tier}-{age_days}", tier, age_days=age_days)
    response = await post(service, "/v1/videos", {"prompt": "x"}, auth)
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert service.video_scheduler.enqueued == []


async def test_video_jobs_at_once_and_the_slot_comes_back(
    tmp_path: Path, backend: StateConfig
) -> None:
    service = make_service(tmp_path, backend)
    auth = service.other_auth("plus-video", "plus", age_days=30)
    first = await post(service, "/v1/videos", {"prompt": "x"}, auth)
    assert first.status_code == 200
    second = await post(service, "/v1/videos", {"prompt": "y"}, auth)
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "concurrent_jobs_exceeded"
    async with client_of(service) as client:
        await client.delete(f"/v1/videos/{first.json()['id']}", headers=auth)
    third = await post(service, "/v1/videos", {"prompt": "z"}, auth)
    assert third.status_code == 200


@pytest.mark.parametrize(
    ("tier", "body", "param"),
    [
        ("free", {"prompt": "x", "n": 2}, "n"),
        ("free", {"prompt": "x", "num_inference_steps": 31}, "num_inference_steps"),
        ("plus", {"prompt": "x", "n": 5}, "n"),
    ],
)
async def test_tier_caps_are_400_naming_the_field(
    tmp_path: Path, tier: str, body: dict[str, Any], param: str
) -> None:
    service = Service(tmp_path)
    auth = service.other_auth(f"capped-{tier}", tier, age_days=30)
    response = await post(service, "/v1/images/generations", body, auth)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert await ledger_images(service, f"capped-{tier}") == 0


async def test_video_length_is_capped_per_tier(tmp_path: Path) -> None:
    service = Service(tmp_path)
    auth = service.other_auth("plus-long", "plus", age_days=30)
    response = await post(service, "/v1/videos", {"prompt": "x", "seconds": "12"}, auth)
    assert response.status_code == 400 and response.json()["error"]["param"] == "seconds"


async def test_idempotent_image_requests_run_and_charge_once(
    tmp_path: Path, backend: StateConfig
) -> None:
    service = make_service(tmp_path, backend)
    auth = {**service.other_auth("careful", "plus", age_days=30), "Idempotency-Key": "img-1"}
    body = {"prompt": "x", "n": 2, "seed": 5}
    concurrent = await asyncio.gather(
        *(post(service, "/v1/images/generations", body, auth) for _ in range(5))
    )
    assert {r.status_code for r in concurrent} <= {200, 409}
    assert 200 in {r.status_code for r in concurrent}
    for conflict in (r for r in concurrent if r.status_code == 409):
        assert conflict.json()["error"]["code"] == "idempotency_key_in_use"
    first = next(r for r in concurrent if r.status_code == 200)
    sequential = [await post(service, "/v1/images/generations", body, auth) for _ in range(5)]
    assert all(r.status_code == 200 and r.json() == first.json() for r in sequential)
    assert all(r.headers["idempotent-replayed"] == "true" for r in sequential)
    assert len(service.scheduler.jobs) == 1
    assert await ledger_images(service, "careful") == 2

    other = await post(service, "/v1/images/generations", {**body, "n": 1}, auth)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    bad = await post(service, "/v1/images/generations", body, {**auth, "Idempotency-Key": "a b"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"


async def test_idempotent_video_requests_make_one_job(tmp_path: Path, backend: StateConfig) -> None:
    service = make_service(tmp_path, backend)
    auth = {**service.other_auth("video-retry", "pro"), "Idempotency-Key": "vid-1"}
    body = {"prompt": "a kite", "seconds": "4"}
    responses = list(
        await asyncio.gather(*(post(service, "/v1/videos", body, auth) for _ in range(5)))
    )
    responses += [await post(service, "/v1/videos", body, auth) for _ in range(5)]
    ids = {r.json()["id"] for r in responses if r.status_code == 200}
    assert len(ids) == 1 and {r.status_code for r in responses} <= {200, 409}
    assert len(service.video_scheduler.enqueued) == 1
    account = service.accounts.get_account("video-retry")
    assert account is not None
    usage = await service.gateway.guard.ledger.usage(account)
    assert usage.video_jobs_active == 1  # one slot taken, not five


async def test_a_failed_request_gives_its_key_back(tmp_path: Path, backend: StateConfig) -> None:
    service = make_service(tmp_path, backend)
    auth = {**service.other_auth("retrier", "free"), "Idempotency-Key": "retry-me"}
    service.scheduler.fail_with = GenerationFailed("the model broke")
    failed = await post(service, "/v1/images/generations", {"prompt": "x"}, auth)
    assert failed.status_code == 500
    service.scheduler.fail_with = None
    retried = await post(service, "/v1/images/generations", {"prompt": "x"}, auth)
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert await ledger_images(service, "retrier") == 1


async def test_a_refused_video_leaves_no_uploaded_file_behind(tmp_path: Path) -> None:
    from tests.fakes import solid_png

    service = Service(tmp_path)
    auth = service.other_auth("plus-uploader", "plus", age_days=30)
    files: dict[str, tuple[str | None, str | bytes] | tuple[str, bytes, str]] = {
        "prompt": (None, "x"),
        "input_reference": ("r.png", solid_png(16, 16, 1), "image/png"),
    }
    async with client_of(service) as client:
        first = await client.post("/v1/videos", files=files, headers=auth)
        second = await client.post("/v1/videos", files=files, headers=auth)
    assert (first.status_code, second.status_code) == (200, 429)
    references = [p for p in service.artifacts.root.iterdir() if p.name.startswith("ref_")]
    assert len(references) == 1  # the refused request's upload was removed again
