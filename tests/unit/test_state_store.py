"""The state store's contract, run against both backends: SQLite and a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mediagate.stores import JobStore, StateConfig, VideoJobRecord, open_state_store


@pytest.fixture
async def store(state_config: StateConfig) -> AsyncIterator[JobStore]:
    job_store = open_state_store(state_config)
    yield job_store
    await job_store.close()


def job(job_id: str, account: str = "acct-a", **fields: Any) -> VideoJobRecord:
    values: dict[str, Any] = {
        "id": job_id,
        "account_id": account,
        "model": "tiny-wan",
        "status": "queued",
        "prompt": "p",
        "seconds": 4,
        "size": "64x64",
        "created_at": 1000.0,
        "generation": {"seed": 1},
    }
    return VideoJobRecord(**(values | fields))


async def test_create_get_and_ownership(store: JobStore) -> None:
    await store.create_job(job("video_1"))
    got = await store.get_job("acct-a", "video_1")
    assert got is not None and got.generation == {"seed": 1} and got.status == "queued"
    assert await store.get_job("acct-b", "video_1") is None
    assert await store.get_job("acct-a", "video_2") is None
    with pytest.raises(Exception):  # noqa: B017 - each backend raises its own duplicate error
        await store.create_job(job("video_1", prompt="another job with the same id"))


async def test_a_resent_create_of_the_same_job_is_taken_as_done(redis_url: str) -> None:
    """redis-py sends a MULTI/EXEC again when the connection broke under it; if the first
    EXEC landed (its answer lost), the resend meets the job it wrote itself."""
    from mediagate.stores.redis_store import RedisStateStore

    store = RedisStateStore(redis_url)
    try:
        record = job("video_resent")
        await store.create_job(record)
        await store.create_job(record)  # the resend: the very same record
        assert await store.get_job("acct-a", "video_resent") == record
        listed, _ = await store.list_jobs("acct-a", after=None, limit=100, order="asc")
        assert [listed_job.id for listed_job in listed].count("video_resent") == 1
    finally:
        await store.close()


async def test_list_pages_in_both_orders(store: JobStore) -> None:
    for index in range(5):
        await store.create_job(job(f"video_{index}", created_at=1000.0 + index))
    await store.create_job(job("video_other", account="acct-b", created_at=1002.5))

    first, more = await store.list_jobs("acct-a", after=None, limit=2, order="asc")
    assert [j.id for j in first] == ["video_0", "video_1"] and more
    second, more = await store.list_jobs("acct-a", after="video_1", limit=2, order="asc")
    assert [j.id for j in second] == ["video_2", "video_3"] and more
    last, more = await store.list_jobs("acct-a", after="video_3", limit=2, order="asc")
    assert [j.id for j in last] == ["video_4"] and not more

    newest, more = await store.list_jobs("acct-a", after=None, limit=3, order="desc")
    assert [j.id for j in newest] == ["video_4", "video_3", "video_2"] and more
    rest, more = await store.list_jobs("acct-a", after="video_2", limit=3, order="desc")
    assert [j.id for j in rest] == ["video_1", "video_0"] and not more

    assert await store.list_jobs("acct-a", after="video_other", limit=2, order="asc") == ([], False)


async def test_update_is_compare_and_set(store: JobStore) -> None:
    await store.create_job(job("video_1"))
    claimed = await store.update_job(
        "acct-a",
        "video_1",
        expect_status=("queued",),
        expect_attempt=0,
        changes={"status": "in_progress", "attempt": 1, "lease_expires_at": 50.0},
    )
    assert claimed is not None and claimed.status == "in_progress" and claimed.attempt == 1
    # Wrong status, wrong attempt, wrong account: nothing changes.
    assert (
        await store.update_job("acct-a", "video_1", expect_status=("queued",), changes={})
    ) is None
    stale = await store.update_job(
        "acct-a",
        "video_1",
        expect_status=("in_progress",),
        expect_attempt=0,
        changes={"status": "completed"},
    )
    assert stale is None
    assert (
        await store.update_job("acct-b", "video_1", expect_status=("in_progress",), changes={})
    ) is None
    got = await store.get_job("acct-a", "video_1")
    assert got is not None and got.status == "in_progress" and got.lease_expires_at == 50.0


async def test_concurrent_claims_have_exactly_one_winner(store: JobStore) -> None:
    await store.create_job(job("video_1"))

    async def claim(worker: int) -> VideoJobRecord | None:
        return await store.update_job(
            "acct-a",
            "video_1",
            expect_status=("queued",),
            expect_attempt=0,
            changes={"status": "in_progress", "attempt": 1, "error_message": f"w{worker}"},
        )

    results = await asyncio.gather(*(claim(worker) for worker in range(20)))
    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    stored = await store.get_job("acct-a", "video_1")
    assert stored is not None and stored.error_message == winners[0].error_message


async def test_delete_returns_what_it_removed(store: JobStore) -> None:
    await store.create_job(job("video_1"))
    assert await store.delete_job("acct-b", "video_1") is None
    removed = await store.delete_job("acct-a", "video_1")
    assert removed is not None and removed.id == "video_1"
    assert await store.delete_job("acct-a", "video_1") is None
    assert await store.get_job("acct-a", "video_1") is None
    assert await store.list_jobs("acct-a", after=None, limit=10, order="asc") == ([], False)
    assert await store.active_jobs("tiny-wan") == []


async def test_active_jobs_follow_status_across_accounts(store: JobStore) -> None:
    await store.create_job(job("video_2", created_at=1002.0))
    await store.create_job(job("video_1", account="acct-b", created_at=1001.0))
    await store.create_job(job("video_3", created_at=1003.0, model="other"))
    active = await store.active_jobs("tiny-wan")
    assert [(j.account_id, j.id) for j in active] == [("acct-b", "video_1"), ("acct-a", "video_2")]

    await store.update_job(
        "acct-b",
        "video_1",
        expect_status=("queued",),
        changes={"status": "completed", "completed_at": 1010.0, "expires_at": 2000.0},
    )
    assert [j.id for j in await store.active_jobs("tiny-wan")] == ["video_2"]
    await store.update_job(
        "acct-a", "video_2", expect_status=("queued",), changes={"status": "in_progress"}
    )
    assert [j.status for j in await store.active_jobs("tiny-wan")] == ["in_progress"]


async def test_expired_jobs(store: JobStore) -> None:
    for index, expires_at in enumerate((1500.0, 2500.0)):
        await store.create_job(job(f"video_{index}", created_at=1000.0 + index))
        await store.update_job(
            "acct-a",
            f"video_{index}",
            expect_status=("queued",),
            changes={"status": "completed", "completed_at": 1100.0, "expires_at": expires_at},
        )
    assert [j.id for j in await store.expired_jobs(1000.0)] == []
    assert [j.id for j in await store.expired_jobs(2000.0)] == ["video_0"]
    assert sorted(j.id for j in await store.expired_jobs(3000.0)) == ["video_0", "video_1"]
    await store.delete_job("acct-a", "video_0")
    assert [j.id for j in await store.expired_jobs(3000.0)] == ["video_1"]


async def test_redis_keys_are_hash_tagged_per_account(redis_url: str) -> None:
    """Every key an account owns shares its hash tag, so Redis Cluster keeps them in one slot."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = open_state_store(StateConfig(backend="redis", redis_url=redis_url))
    await store.create_job(job("video_1", account="acct-x"))
    await store.close()
    # Without decode_responses the keys are bytes; redis-py types them as `bytes | str`.
    account_keys = [
        key.decode() if isinstance(key, bytes) else key for key in client.keys("*{a:acct-x}*")
    ]
    assert sorted(account_keys) == ["mg:{a:acct-x}:job:video_1", "mg:{a:acct-x}:jobs"]
    from redis.crc import key_slot

    assert len({key_slot(key.encode()) for key in account_keys}) == 1


async def test_an_unreachable_redis_is_a_503_with_retry_after_and_no_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The 503 says to retry and nothing about the store; the log names the store with
    its password blanked out."""
    from fastapi.testclient import TestClient

    from deployments.router.routes import create_api
    from mediagate.stores import StoreUnavailable
    from tests.servers import free_port
    from tests.unit.harness import Service

    port = free_port()
    dead = open_state_store(
        StateConfig(backend="redis", redis_url=f"redis://mguser:s3cret-pw@127.0.0.1:{port}/0")
    )
    with pytest.raises(StoreUnavailable):
        await dead.get_job("acct", "video_1")
    assert f"redis://***@127.0.0.1:{port}/0" in caplog.text

    service = Service(tmp_path)
    service.gateway.jobs = dead
    client = TestClient(create_api(service.gateway), raise_server_exceptions=False)
    response = client.get("/v1/videos/video_1", headers=service.auth)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "store_unavailable"
    assert response.headers["retry-after"] == "2"
    created = client.post("/v1/videos", json={"prompt": "x"}, headers=service.auth)
    assert created.status_code == 503 and service.video_scheduler.enqueued == []
    for text in (response.text, created.text, caplog.text):
        assert "s3cret-pw" not in text and "mguser" not in text
    assert str(port) not in response.text + created.text


def test_redacted_urls_keep_host_and_port_only() -> None:
    from mediagate.stores.redis_store import redacted_url

    assert redacted_url("redis://:pw@h:6379/0") == "redis://***@h:6379/0"
    assert redacted_url("rediss://u:pw@[::1]:6380") == "rediss://***@[::1]:6380"
    assert redacted_url("redis://h:6379") == "redis://h:6379"


async def test_a_lost_exec_reply_is_not_applied_twice(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py reports a connection lost during EXEC as a WatchError: the write may have
    landed. A retry that finds exactly that write must take it as done, not redo it."""
    from redis.asyncio.client import Pipeline
    from redis.exceptions import WatchError

    from mediagate.stores.redis_store import RedisStateStore

    real_execute = Pipeline.execute
    lost = {"left": 0}

    async def execute_then_lose_the_reply(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        answer = await real_execute(self, *args, **kwargs)
        if lost["left"] and self.watching is False and self.command_stack == []:
            lost["left"] -= 1
            raise WatchError("A ConnectionError occurred while watching one or more keys")
        return answer

    monkeypatch.setattr(Pipeline, "execute", execute_then_lose_the_reply)
    store = RedisStateStore(redis_url)
    try:
        await store.create_job(job("video_lost"))
        lost["left"] = 1
        claimed = await store.update_job(
            "acct-a",
            "video_lost",
            expect_status=("queued",),
            expect_attempt=0,
            changes={"status": "in_progress", "attempt": 1},
        )
        assert lost["left"] == 0  # the claim's EXEC reply was lost
        assert claimed is not None and claimed.attempt == 1  # the claim is ours

        def add_one(current: str | None) -> tuple[str, int]:
            count = int(current or 0) + 1
            return str(count), count

        lost["left"] = 1
        assert await store.mutate("acct-a", "lost_counter", add_one) == 1
        assert lost["left"] == 0  # the increment's EXEC reply was lost
        assert await store.mutate("acct-a", "lost_counter", lambda c: (c, c)) == "1"  # once
    finally:
        await store.close()
