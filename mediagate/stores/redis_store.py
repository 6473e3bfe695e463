"""The production state store: Redis (standalone or Redis Cluster).

Key layout. Everything an account owns shares one hash tag, ``{a:<account>}``,
so it lives in one Redis Cluster slot and can change atomically together:

    mg:{a:<account>}:job:<id>   the job, as JSON
    mg:{a:<account>}:jobs       sorted set of the account's job ids by creation time
    mg:{a:<account>}:event:<id> an outbox event (webhooks), as JSON

Two cross-account indexes live in their own slots and are *hints*, never truth:

    mg:{m:<model>}:active       set of ``account/job`` refs that may be queued or running
    mg:{expiry}                 sorted set of ``account/job`` refs by content expiry
    mg:{outbox}                 sorted set of ``account/event`` refs by when they are due

A hint is written before the job it points at and removed after the job leaves
that state, so a crash in between leaves a stale hint (skipped and cleaned when
read), never a job that no index can find. Compare-and-set uses WATCH/MULTI on
the job key: the transaction fails, and is retried, if anyone else wrote it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from mediagate.protocol.errors import StoreUnavailable
from mediagate.stores.base import DocumentChange, ListOrder
from mediagate.stores.records import ACTIVE_STATUSES, OutboxEvent, VideoJobRecord, split_ref
from mediagate.stores.redis_outbox import OUTBOX_KEY, RedisOutbox, event_key

logger = logging.getLogger(__name__)

T = TypeVar("T")
PREFIX = "mg"


def job_key(account_id: str, job_id: str) -> str:
    return f"{PREFIX}:{{a:{account_id}}}:job:{job_id}"


def account_jobs_key(account_id: str) -> str:
    return f"{PREFIX}:{{a:{account_id}}}:jobs"


def active_key(model: str) -> str:
    return f"{PREFIX}:{{m:{model}}}:active"


EXPIRY_KEY = f"{PREFIX}:{{expiry}}"


def document_key(account_id: str, name: str) -> str:
    return f"{PREFIX}:{{a:{account_id}}}:doc:{name}"


def blocking_pool(url: str, *, decode_responses: bool = False) -> Any:
    """A pool that makes callers wait for a free connection instead of failing at once
    ("Too many connections") when hundreds of requests arrive together.

    A command that meets a broken connection is sent once more on a fresh one: after
    Redis restarts, every idle connection in the pool is dead, and without this each
    failed one request (a 503) after the store was back. Only connection errors are
    retried (a timeout may mean the command ran); transactions under WATCH are never
    resent blindly (redis-py turns the error into a WatchError, and ``mutate`` then
    checks whether its write landed). Left: a job creation whose EXEC ran but whose
    answer was lost is resent and then finds its own record ("already exists").
    """
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    return redis.BlockingConnectionPool.from_url(
        url,
        max_connections=64,
        timeout=5,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        decode_responses=decode_responses,
    )


async def call_redis(url: str, operation: Callable[[], Awaitable[T]]) -> T:
    """Run ``operation``; a Redis that cannot be reached becomes ``StoreUnavailable`` (503)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    try:
        return await operation()
    except (RedisConnectionError, RedisTimeoutError, OSError) as error:
        logger.warning("redis at %s is unreachable: %r", redacted_url(url), error)
        raise StoreUnavailable(STORE_UNREACHABLE) from error


STORE_UNREACHABLE = "the state store is unreachable; please retry shortly"


def redacted_url(url: str) -> str:
    """``url`` fit for a log line: the password (and user name) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStateStore(RedisOutbox):
    """``JobStore`` on Redis, through ``redis.asyncio`` (the outbox's methods in
    ``redis_outbox``)."""

    def __init__(self, url: str, *, client: Any = None) -> None:
        import redis.asyncio as redis

        self.url = url
        self._redis: Any = client or redis.Redis(connection_pool=blocking_pool(url))
        # Serialises this process's transactions per document: optimistic WATCH/MULTI
        # then only retries on writes from *other* processes.
        self._locks: dict[str, asyncio.Lock] = {}

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await call_redis(self.url, operation)

    async def create_job(self, job: VideoJobRecord) -> None:
        async def create() -> None:
            await self._redis.sadd(active_key(job.model), job.ref)  # hint first
            async with self._redis.pipeline(transaction=True) as tx:
                tx.set(job_key(job.account_id, job.id), job.model_dump_json(), nx=True)
                tx.zadd(account_jobs_key(job.account_id), {job.id: job.created_at})
                created, _ = await tx.execute()
            if not created:
                # redis-py sends a transaction again on a fresh connection when the first
                # broke, and an EXEC that landed before its answer was lost is then refused
                # (NX): finding exactly this record means it was ours.
                stored = await self._redis.get(job_key(job.account_id, job.id))
                if stored is None or VideoJobRecord.model_validate_json(stored) != job:
                    raise ValueError(f"job {job.id} already exists")

        await self._call(create)

    async def get_job(self, account_id: str, job_id: str) -> VideoJobRecord | None:
        raw = await self._call(lambda: self._redis.get(job_key(account_id, job_id)))
        return VideoJobRecord.model_validate_json(raw) if raw else None

    async def list_jobs(
        self, account_id: str, *, after: str | None, limit: int, order: ListOrder
    ) -> tuple[list[VideoJobRecord], bool]:
        index = account_jobs_key(account_id)

        async def page() -> tuple[list[VideoJobRecord], bool]:
            start = 0
            if after is not None:
                rank = await (
                    self._redis.zrank(index, after)
                    if order == "asc"
                    else self._redis.zrevrank(index, after)
                )
                if rank is None:
                    return [], False
                start = rank + 1
            ids = await self._redis.zrange(index, start, start + limit, desc=order == "desc")
            if not ids:
                return [], False
            docs = await self._redis.mget([job_key(account_id, i.decode()) for i in ids])
            jobs = [VideoJobRecord.model_validate_json(doc) for doc in docs[:limit] if doc]
            return jobs, len(ids) > limit

        return await self._call(page)

    async def update_job(
        self,
        account_id: str,
        job_id: str,
        *,
        expect_status: Collection[str],
        expect_attempt: int | None = None,
        changes: dict[str, Any],
        events: Sequence[OutboxEvent] = (),
    ) -> VideoJobRecord | None:
        from redis.exceptions import WatchError

        key = job_key(account_id, job_id)
        if any(event.account_id != account_id for event in events):
            raise ValueError("a job's events belong to its account")

        async def compare_and_set() -> VideoJobRecord | None:
            # (before, after) of our last EXEC: redis-py reports a connection lost during
            # EXEC as a WatchError too, so a retry that finds our own write must win.
            written: tuple[VideoJobRecord, VideoJobRecord] | None = None
            while True:
                async with self._redis.pipeline(transaction=True) as tx:
                    try:
                        await tx.watch(key)
                        raw = await tx.get(key)
                        if raw is None:
                            return None
                        current = VideoJobRecord.model_validate_json(raw)
                        if written is not None and current == written[1]:
                            before, updated = written
                            break
                        if current.status not in expect_status or (
                            expect_attempt is not None and current.attempt != expect_attempt
                        ):
                            return None
                        updated = VideoJobRecord.model_validate({**current.model_dump(), **changes})
                        if updated.expires_at is not None and updated.status != current.status:
                            await self._redis.zadd(EXPIRY_KEY, {updated.ref: updated.expires_at})
                        if events:  # hints first, as for the other indexes
                            await self._redis.zadd(
                                OUTBOX_KEY, {event.ref: event.due_at for event in events}
                            )
                        tx.multi()
                        tx.set(key, updated.model_dump_json())
                        for event in events:
                            tx.set(
                                event_key(account_id, event.id), event.model_dump_json(), nx=True
                            )
                        written = (current, updated)
                        await tx.execute()
                        before = current
                        break
                    except WatchError:
                        continue
            if updated.status not in ACTIVE_STATUSES:
                await self._redis.srem(active_key(updated.model), updated.ref)
            elif before.status not in ACTIVE_STATUSES:
                await self._redis.sadd(active_key(updated.model), updated.ref)
            return updated

        return await self._call(compare_and_set)

    async def delete_job(self, account_id: str, job_id: str) -> VideoJobRecord | None:
        key = job_key(account_id, job_id)

        async def delete() -> VideoJobRecord | None:
            async with self._redis.pipeline(transaction=True) as tx:
                tx.get(key)
                tx.delete(key)
                tx.zrem(account_jobs_key(account_id), job_id)
                raw, _, _ = await tx.execute()
            if raw is None:
                return None
            job = VideoJobRecord.model_validate_json(raw)
            await self._redis.srem(active_key(job.model), job.ref)
            await self._redis.zrem(EXPIRY_KEY, job.ref)
            return job

        return await self._call(delete)

    async def _resolve(self, refs: list[bytes]) -> list[tuple[bytes, VideoJobRecord | None]]:
        keys = [job_key(*split_ref(ref.decode())) for ref in refs]
        docs = await self._redis.mget(keys) if keys else []
        return [
            (ref, VideoJobRecord.model_validate_json(doc) if doc else None)
            for ref, doc in zip(refs, docs, strict=True)
        ]

    async def active_jobs(self, model: str) -> list[VideoJobRecord]:
        async def read() -> list[VideoJobRecord]:
            refs = list(await self._redis.smembers(active_key(model)))
            jobs = []
            for ref, job in await self._resolve(refs):
                if job is None or job.status not in ACTIVE_STATUSES:
                    await self._redis.srem(active_key(model), ref)  # stale hint
                else:
                    jobs.append(job)
            return sorted(jobs, key=lambda job: (job.created_at, job.id))

        return await self._call(read)

    async def expired_jobs(self, now: float, limit: int = 100) -> list[VideoJobRecord]:
        async def read() -> list[VideoJobRecord]:
            refs = await self._redis.zrangebyscore(EXPIRY_KEY, "-inf", now, start=0, num=limit)
            jobs = []
            for ref, job in await self._resolve(refs):
                if job is None or job.expires_at is None:
                    await self._redis.zrem(EXPIRY_KEY, ref)  # stale hint
                elif job.expires_at > now:
                    await self._redis.zadd(EXPIRY_KEY, {ref: job.expires_at})  # moved on
                else:
                    jobs.append(job)
            return jobs

        return await self._call(read)

    async def mutate(
        self, account_id: str, name: str, change: DocumentChange[T], *, ttl_s: float | None = None
    ) -> T:
        from redis.exceptions import WatchError

        key = document_key(account_id, name)
        if len(self._locks) > 10_000:  # forget idle locks now and then
            self._locks = {k: v for k, v in self._locks.items() if v.locked()}
        lock = self._locks.setdefault(key, asyncio.Lock())

        async def transaction() -> T:
            # Our last EXEC, if its answer was lost: redis-py reports a connection lost
            # during EXEC as a WatchError, and applying the change again would count it
            # twice. A retry that finds exactly what we wrote takes it as done.
            written: tuple[str | None, T] | None = None
            async with lock:
                while True:
                    async with self._redis.pipeline(transaction=True) as tx:
                        try:
                            await tx.watch(key)
                            raw = await tx.get(key)
                            current = raw.decode() if raw is not None else None
                            if written is not None and current == written[0]:
                                return written[1]
                            updated, result = change(current)
                            if updated != current:
                                tx.multi()
                                if updated is None:
                                    tx.delete(key)
                                elif ttl_s is not None:
                                    tx.set(key, updated, px=int(ttl_s * 1000))
                                else:
                                    tx.set(key, updated)
                                written = (updated, result)
                                await tx.execute()
                            return result
                        except WatchError:
                            continue

        return await self._call(transaction)

    async def purge_expired_documents(self, limit: int = 10_000) -> int:
        """Redis drops documents at their TTL (``PX``) by itself."""
        return 0

    async def close(self) -> None:
        await self._redis.aclose()
