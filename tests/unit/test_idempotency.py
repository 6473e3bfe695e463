"""``Idempotency-Key`` at the HTTP edge, on both state backends: a repeat while the first
request runs, multipart video retries, a reused key, stale claims, expiry and cancellation.

What ``tests/unit/test_tier_enforcement.py`` already checks (concurrent repeats charge
once, a failed request gives its key back) is not repeated here.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import mediagate.access.idempotency
import mediagate.stores.sqlite_store
from mediagate.access.accounts import Account, open_account_store
from mediagate.access.idempotency import (
    IDEMPOTENCY_TTL_S,
    STALE_CLAIM_S,
    IdempotencyKeys,
    StoredAnswer,
    fingerprint,
)
from mediagate.access.quota import Usage
from mediagate.protocol.errors import Conflict, GenerationFailed
from mediagate.protocol.work import ImageJob, ImageResult
from mediagate.stores import StateConfig, VideoJobRecord, open_state_store
from tests.fakes import FakeClock, FakeScheduler, LocalHandle, solid_png
from tests.unit.harness import URL, Service

BODY = {"prompt": "a lighthouse", "n": 2, "seed": 7}
# Generous: only a regression that hangs (a request waiting on the held scheduler, an
# event that never fires) should ever reach it, and then fails instead of hanging.
HANG_S = 30.0


class HeldScheduler(FakeScheduler):
    """A scheduler whose ``submit`` waits until the test sets ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def submit(self, job: ImageJob) -> ImageResult:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return await super().submit(job)


def make_service(tmp_path: Path, config: StateConfig) -> Service:
    return Service(tmp_path, jobs=open_state_store(config), accounts=open_account_store(config))


def hold_scheduler(service: Service) -> HeldScheduler:
    """Put a held scheduler behind the image model in place of the harness's fake."""
    held = HeldScheduler()
    service.gateway.schedulers["tiny-sd"] = LocalHandle(held)
    service.scheduler = held
    return held


def client_of(service: Service) -> httpx.AsyncClient:
    """The app on this test's event loop (the Redis clients belong to one loop)."""
    transport = httpx.ASGITransport(app=service.client.app)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def account_of(service: Service, name: str) -> Account:
    account = service.accounts.get_account(name)
    assert account is not None
    return account


async def usage_of(service: Service, name: str) -> Usage:
    return await service.gateway.guard.ledger.usage(account_of(service, name))


async def jobs_of(service: Service, name: str) -> list[VideoJobRecord]:
    account_id = account_of(service, name).id
    jobs, _ = await service.jobs.list_jobs(account_id, after=None, limit=100, order="asc")
    return jobs


def reference_files(service: Service) -> list[str]:
    return [path.name for path in service.artifacts.root.iterdir() if path.name.startswith("ref_")]


def assert_key_error(response: httpx.Response, status: int, code: str) -> None:
    """An OpenAI error envelope naming the Idempotency-Key."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, "Idempotency-Key")


def video_form(reference: bytes) -> dict[str, Any]:
    """The multipart form the openai python client 3.x sends for ``videos.create``."""
    return {
        "prompt": (None, "a kite over the sea"),
        "seconds": (None, "4"),
        "size": (None, "32x48"),
        "input_reference": ("ref.png", reference, "image/png"),
    }


async def test_a_repeat_while_the_first_runs_is_409_then_gets_the_first_answer(
    tmp_path: Path, state_config: StateConfig
) -> None:
    service = make_service(tmp_path, state_config)
    held = hold_scheduler(service)
    auth = {**service.other_auth("patient", "plus", age_days=30), "Idempotency-Key": "img-run"}
    async with client_of(service) as client:
        first = asyncio.create_task(client.post(URL, json=BODY, headers=auth))
        await asyncio.wait_for(held.started.wait(), HANG_S)

        in_use = await asyncio.wait_for(client.post(URL, json=BODY, headers=auth), HANG_S)
        assert not first.done()  # answered while the first was still held
        assert_key_error(in_use, 409, "idempotency_key_in_use")
        assert int(in_use.headers["retry-after"]) >= 1
        assert (await usage_of(service, "patient")).images_today == 2  # the first's only

        held.release.set()
        answered = await asyncio.wait_for(first, HANG_S)
        again = await client.post(URL, json=BODY, headers=auth)

    assert answered.status_code == 200 and "idempotent-replayed" not in answered.headers
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == answered.json()
    remaining = answered.headers["x-ratelimit-remaining-images"]
    assert again.headers["x-ratelimit-remaining-images"] == remaining == "198"
    assert held.calls == 1
    assert (await usage_of(service, "patient")).images_today == 2


async def test_a_multipart_video_retry_gets_the_same_job(
    tmp_path: Path, state_config: StateConfig
) -> None:
    service = make_service(tmp_path, state_config)
    auth = {**service.other_auth("kiter", "pro"), "Idempotency-Key": "vid-form"}
    reference = solid_png(40, 40, seed=3)
    async with client_of(service) as client:
        first = await client.post("/v1/videos", files=video_form(reference), headers=auth)
        retry = await client.post("/v1/videos", files=video_form(reference), headers=auth)

    # Each send draws a new multipart boundary: the key must match on content, not bytes.
    assert first.request.headers["content-type"] != retry.request.headers["content-type"]
    assert first.status_code == 200, first.text
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["id"] == first.json()["id"]
    assert [job.id for job in await jobs_of(service, "kiter")] == [first.json()["id"]]
    assert len(service.video_scheduler.enqueued) == 1
    assert (await usage_of(service, "kiter")).video_jobs_active == 1
    assert len(reference_files(service)) == 1  # the retry's upload was not kept


async def test_keys_belong_to_one_account(tmp_path: Path, state_config: StateConfig) -> None:
    """Another account's same key and body is its own request: never a replay (which
    would hand it the first account's images) nor a 409/422."""
    service = make_service(tmp_path, state_config)
    alice = {**service.other_auth("alice-2", "plus", age_days=30), "Idempotency-Key": "k"}
    bob = {**service.other_auth("bob-2", "plus", age_days=30), "Idempotency-Key": "k"}
    async with client_of(service) as client:
        first = await client.post(URL, json=BODY, headers=alice)
        other = await client.post(URL, json=BODY, headers=bob)

    assert first.status_code == other.status_code == 200, other.text
    assert "idempotent-replayed" not in other.headers
    owners = [account_of(service, name).id for name in ("alice-2", "bob-2")]
    assert [job.account_id for job in service.scheduler.jobs] == owners
    assert (await usage_of(service, "bob-2")).images_today == 2


async def test_a_key_reused_for_another_image_request_is_422_and_changes_nothing(
    tmp_path: Path, state_config: StateConfig
) -> None:
    service = make_service(tmp_path, state_config)
    held = hold_scheduler(service)
    auth = {**service.other_auth("reuser", "plus", age_days=30), "Idempotency-Key": "img-reuse"}
    other = {**BODY, "n": 1}
    async with client_of(service) as client:
        first = asyncio.create_task(client.post(URL, json=BODY, headers=auth))
        await asyncio.wait_for(held.started.wait(), HANG_S)
        while_running = await asyncio.wait_for(client.post(URL, json=other, headers=auth), HANG_S)
        held.release.set()
        answered = await asyncio.wait_for(first, HANG_S)
        after = await client.post(URL, json=other, headers=auth)
        original = await client.post(URL, json=BODY, headers=auth)

    assert_key_error(while_running, 422, "idempotency_key_reused")
    assert_key_error(after, 422, "idempotency_key_reused")
    assert held.calls == 1
    assert (await usage_of(service, "reuser")).images_today == 2  # the first request's only
    assert original.headers["idempotent-replayed"] == "true"  # its answer is still kept
    assert original.json() == answered.json()


async def test_a_key_reused_for_another_video_upload_is_422_and_changes_nothing(
    tmp_path: Path, state_config: StateConfig
) -> None:
    service = make_service(tmp_path, state_config)
    auth = {**service.other_auth("swapper", "pro"), "Idempotency-Key": "vid-reuse"}
    async with client_of(service) as client:
        original = video_form(solid_png(40, 40, 1))
        other = video_form(solid_png(40, 40, 2))  # same fields, another image
        first = await client.post("/v1/videos", files=original, headers=auth)
        reused = await client.post("/v1/videos", files=other, headers=auth)

    assert first.status_code == 200, first.text
    assert_key_error(reused, 422, "idempotency_key_reused")
    assert [job.id for job in await jobs_of(service, "swapper")] == [first.json()["id"]]
    assert len(service.video_scheduler.enqueued) == 1
    assert (await usage_of(service, "swapper")).video_jobs_active == 1
    assert len(reference_files(service)) == 1


async def test_a_stale_claim_of_a_crashed_request_is_taken_over(
    tmp_path: Path, state_config: StateConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = make_service(tmp_path, state_config)
    auth = {**service.other_auth("survivor", "plus", age_days=30), "Idempotency-Key": "img-crash"}

    async def router_died(account_id: str, key: str, claim_id: str) -> bool:
        """The first request's router dies before it can give the key back."""
        return False

    monkeypatch.setattr(service.gateway.idempotency, "release", router_died)
    service.scheduler.fail_with = GenerationFailed("the router died mid-request")
    async with client_of(service) as client:
        crashed = await client.post(URL, json=BODY, headers=auth)
        service.scheduler.fail_with = None
        service.clock.advance(STALE_CLAIM_S - 1)
        fresh = await client.post(URL, json=BODY, headers=auth)
        service.clock.advance(2)
        taken_over = await client.post(URL, json=BODY, headers=auth)
        replayed = await client.post(URL, json=BODY, headers=auth)

    assert crashed.status_code == 500
    assert_key_error(fresh, 409, "idempotency_key_in_use")  # not stale yet
    assert taken_over.status_code == 200 and "idempotent-replayed" not in taken_over.headers
    assert len(service.scheduler.jobs) == 2  # the crashed attempt and the takeover
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == taken_over.json()
    assert (await usage_of(service, "survivor")).images_today == 2


async def test_a_key_expires_after_its_ttl_on_the_store_clock(
    tmp_path: Path, state_config: StateConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both stores expire documents by the wall clock (SQLite's ``time.time()``, Redis'
    own ``PX``), not the app's clock: with a short TTL, wait (poll) until the key is gone."""
    monkeypatch.setattr(mediagate.access.idempotency, "IDEMPOTENCY_TTL_S", 0.3)
    service = make_service(tmp_path, state_config)
    auth = {**service.other_auth("forgetful", "plus", age_days=30), "Idempotency-Key": "img-ttl"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_S
    async with client_of(service) as client:
        first = await client.post(URL, json=BODY, headers=auth)
        while True:  # replays cost nothing and write nothing, so they don't extend the TTL
            repeat = await client.post(URL, json=BODY, headers=auth)
            if "idempotent-replayed" not in repeat.headers:
                break
            assert loop.time() < deadline, "the key never expired"
            await asyncio.sleep(0.05)

    assert first.status_code == 200 and repeat.status_code == 200, repeat.text
    assert len(service.scheduler.jobs) == 2
    assert (await usage_of(service, "forgetful")).images_today == 4


async def test_a_key_is_kept_24_hours_and_then_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real TTL end to end, on SQLite with its expiry clock made the app's fake clock.
    (Redis expires on the server's clock; the test above shows it honours the TTL given.)"""
    assert IDEMPOTENCY_TTL_S == 24 * 3600
    service = Service(tmp_path)
    monkeypatch.setattr(mediagate.stores.sqlite_store, "time", SimpleNamespace(time=service.clock))
    auth = {**service.other_auth("daily", "plus", age_days=30), "Idempotency-Key": "img-day"}
    async with client_of(service) as client:
        first = await client.post(URL, json=BODY, headers=auth)
        service.clock.advance(IDEMPOTENCY_TTL_S - 60)
        kept = await client.post(URL, json=BODY, headers=auth)
        service.clock.advance(61)
        expired = await client.post(URL, json=BODY, headers=auth)

    assert first.status_code == 200
    assert kept.headers["idempotent-replayed"] == "true" and kept.json() == first.json()
    assert expired.status_code == 200 and "idempotent-replayed" not in expired.headers
    assert len(service.scheduler.jobs) == 2


async def test_a_request_whose_client_left_gives_its_key_back(
    tmp_path: Path, state_config: StateConfig
) -> None:
    """A client disconnect cancels the handler (Serve does so); the retry must run, not
    get 409 for ``STALE_CLAIM_S``."""
    service = make_service(tmp_path, state_config)
    held = hold_scheduler(service)
    auth = {**service.other_auth("leaver", "plus", age_days=30), "Idempotency-Key": "img-left"}
    async with client_of(service) as client:
        first = asyncio.create_task(client.post(URL, json=BODY, headers=auth))
        await asyncio.wait_for(held.started.wait(), HANG_S)
        first.cancel()
        with suppress(asyncio.CancelledError):
            await first
        held.release.set()
        retried = await client.post(URL, json=BODY, headers=auth)

    assert retried.status_code == 200, retried.text
    assert "idempotent-replayed" not in retried.headers
    assert held.calls == 2
    assert (await usage_of(service, "leaver")).images_today == 2  # the cancelled one refunded


async def test_a_request_whose_claim_was_taken_over_cannot_complete_or_release_it(
    tmp_path: Path, state_config: StateConfig
) -> None:
    """A slow request (A) whose claim went stale and was taken over by a retry (B): A's
    late answer must not replace B's claim, nor its failure delete it."""
    clock = FakeClock()
    keys = IdempotencyKeys(open_state_store(state_config), clock=clock)
    digest = fingerprint("POST", "/v1/images/generations", {"prompt": "x"})
    slow = await keys.claim("acct", "k", digest)
    clock.advance(STALE_CLAIM_S + 1)
    retry = await keys.claim("acct", "k", digest)
    assert slow.claim_id and retry.claim_id and slow.claim_id != retry.claim_id
    late = StoredAnswer(status_code=200, body='"from the slow request"')
    assert not await keys.complete("acct", "k", slow.claim_id, digest, late)
    assert not await keys.release("acct", "k", slow.claim_id)
    with pytest.raises(Conflict):  # the retry still holds the key
        await keys.claim("acct", "k", digest)
    answer = StoredAnswer(status_code=200, body='"from the retry"')
    assert await keys.complete("acct", "k", retry.claim_id, digest, answer)
    assert (await keys.claim("acct", "k", digest)).answer == answer
