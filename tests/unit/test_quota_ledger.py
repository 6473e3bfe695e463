"""The quota ledger on both backends (SQLite, a real redis-server): exact under concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mediagate.access.accounts import Account
from mediagate.access.ledger import QuotaLedger, finish_reservation
from mediagate.access.tiers import load_tier_policy
from mediagate.protocol.errors import QuotaExceeded, RateLimited
from mediagate.stores import JobStore, StateConfig, open_state_store
from tests.fakes import FakeClock

RACES = 20
CONCURRENT = 200


@pytest.fixture
async def store(state_config: StateConfig) -> AsyncIterator[JobStore]:
    job_store = open_state_store(state_config)
    yield job_store
    await job_store.close()


def account(name: str, tier: str, created_at: float = 0.0) -> Account:
    return Account(id=f"acct_{name}", name=name, tier=tier, created_at=created_at)


async def test_free_tier_admits_exactly_three_of_200_concurrent_requests(store: JobStore) -> None:
    ledger = QuotaLedger(store, load_tier_policy(), clock=FakeClock())
    over_admissions = 0
    for race in range(RACES):
        free = account(f"free{race}", "free")

        async def one(free: Account = free) -> str:
            try:
                await ledger.reserve(free, kind="image", units=1)
            except QuotaExceeded as refused:
                assert refused.retry_after_s and refused.retry_after_s > 0
                return "refused"
            return "admitted"

        outcomes = await asyncio.gather(*(one() for _ in range(CONCURRENT)))
        admitted = outcomes.count("admitted")
        over_admissions += max(0, admitted - 3)
        assert admitted == 3 and outcomes.count("refused") == CONCURRENT - 3
        assert (await ledger.usage(free)).images_today == 3
    assert over_admissions == 0


async def test_release_refunds_and_commit_keeps_exactly_once(store: JobStore) -> None:
    ledger = QuotaLedger(store, load_tier_policy(), clock=FakeClock())
    free = account("alice", "free")
    rids = [(await ledger.reserve(free, kind="image", units=1))[0] for _ in range(3)]
    with pytest.raises(QuotaExceeded):
        await ledger.reserve(free, kind="image", units=1)
    releases = await asyncio.gather(
        *(ledger.finish(free.id, rids[0], commit=False) for _ in range(10))
    )
    assert releases.count(True) == 1  # exactly once, however often it is asked
    assert (await ledger.usage(free)).images_today == 2
    assert await ledger.finish(free.id, rids[1], commit=True)
    assert not await finish_reservation(store, free.id, rids[1], commit=False)
    assert (await ledger.usage(free)).images_today == 2
    await ledger.reserve(free, kind="image", units=1)  # the refunded image is usable again


async def test_concurrent_video_jobs_are_exact(store: JobStore) -> None:
    ledger = QuotaLedger(store, load_tier_policy(), clock=FakeClock())
    pro = account("pat", "pro")

    async def one() -> bool:
        try:
            await ledger.reserve(pro, kind="video", units=1)
        except RateLimited:
            return False
        return True

    assert (await asyncio.gather(*(one() for _ in range(50)))).count(True) == 4
    assert (await ledger.usage(pro)).video_jobs_active == 4


async def test_per_minute_rate_is_exact_under_concurrency(store: JobStore) -> None:
    clock = FakeClock()
    ledger = QuotaLedger(store, load_tier_policy(), clock=clock)
    pro = account("pam", "pro")  # 60 per minute

    async def one() -> bool:
        try:
            await ledger.reserve(pro, kind="image", units=1)
        except RateLimited as refused:
            assert refused.retry_after_s is not None and 0 < refused.retry_after_s <= 60
            return False
        return True

    assert (await asyncio.gather(*(one() for _ in range(100)))).count(True) == 60
    clock.advance(60)
    assert (await asyncio.gather(*(one() for _ in range(100)))).count(True) == 60


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_router_replicas_racing_through_separate_connections(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Four store instances (as four router replicas have) race on one account: Redis's
    WATCH/MULTI retries and SQLite's write lock keep the count exact across them."""
    if backend == "sqlite":
        config = StateConfig.embedded(tmp_path / "state.db")
    else:
        import redis

        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        config = StateConfig(backend="redis", redis_url=url)
    stores = [open_state_store(config) for _ in range(4)]
    policy, clock = load_tier_policy(), FakeClock()
    ledgers = [QuotaLedger(store, policy, clock=clock) for store in stores]
    try:
        for race in range(5):
            free = account(f"replicated{race}", "free")

            async def one(index: int, free: Account = free) -> bool:
                try:
                    await ledgers[index % 4].reserve(free, kind="image", units=1)
                except QuotaExceeded:
                    return False
                return True

            outcomes = await asyncio.gather(*(one(index) for index in range(CONCURRENT)))
            assert outcomes.count(True) == 3
    finally:
        for store in stores:
            await store.close()
