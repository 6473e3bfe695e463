"""The webhook outbox on Redis (part of ``RedisStateStore``).

mg:{a:<account>}:event:<id> an event, as JSON, in its account's slot (written in the
                            same transaction as the job transition that made it)
mg:{outbox}                 sorted set of ``account/event`` refs by when they are
                            due: a hint, as the other cross-account indexes
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mediagate.stores.records import OutboxEvent, split_ref

T = TypeVar("T")
OUTBOX_KEY = "mg:{outbox}"


def event_key(account_id: str, event_id: str) -> str:
    return f"mg:{{a:{account_id}}}:event:{event_id}"


class RedisOutbox:
    """Taking events up and writing them back: compare-and-set on the event's key."""

    _redis: Any

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def due_events(self, now: float, limit: int = 100) -> list[OutboxEvent]:
        async def read() -> list[OutboxEvent]:
            refs = await self._redis.zrangebyscore(OUTBOX_KEY, "-inf", now, start=0, num=limit)
            keys = [event_key(*split_ref(ref.decode())) for ref in refs]
            docs = await self._redis.mget(keys) if keys else []
            due = []
            for ref, doc in zip(refs, docs, strict=True):
                event = OutboxEvent.model_validate_json(doc) if doc else None
                if event is None:
                    await self._redis.zrem(OUTBOX_KEY, ref)  # stale hint (never written, or done)
                elif event.due_at > now:
                    await self._redis.zadd(OUTBOX_KEY, {ref: event.due_at})  # moved on
                else:
                    due.append(event)
            return due

        return await self._call(read)

    async def _change_event(
        self,
        account_id: str,
        event_id: str,
        change: Callable[[OutboxEvent], OutboxEvent | bool | None],
    ) -> OutboxEvent | bool | None:
        """Compare-and-set on one event: ``change`` returns the new event, ``True`` to
        delete it, or ``None``/``False`` to leave it (its answer is then returned)."""
        from redis.exceptions import WatchError

        key = event_key(account_id, event_id)
        ref = f"{account_id}/{event_id}"
        while True:
            async with self._redis.pipeline(transaction=True) as tx:
                try:
                    await tx.watch(key)
                    raw = await tx.get(key)
                    if raw is None:
                        return None
                    outcome = change(OutboxEvent.model_validate_json(raw))
                    if outcome is None or outcome is False:
                        return outcome
                    tx.multi()
                    if outcome is True:
                        tx.delete(key)
                    else:
                        assert isinstance(outcome, OutboxEvent)
                        await self._redis.zadd(OUTBOX_KEY, {ref: outcome.due_at})
                        tx.set(key, outcome.model_dump_json())
                    await tx.execute()
                except WatchError:
                    continue
            if outcome is True:
                await self._redis.zrem(OUTBOX_KEY, ref)
            return outcome

    async def claim_event(
        self, account_id: str, event_id: str, *, now: float, claim: str, hold_s: float
    ) -> OutboxEvent | None:
        def take(event: OutboxEvent) -> OutboxEvent | None:
            if event.due_at > now:
                return None
            return event.model_copy(update={"claim": claim, "due_at": now + hold_s})

        taken = await self._call(lambda: self._change_event(account_id, event_id, take))
        return taken if isinstance(taken, OutboxEvent) else None

    async def finish_event(self, event: OutboxEvent, *, claim: str, done: bool) -> bool:
        def write_back(stored: OutboxEvent) -> OutboxEvent | bool:
            if stored.claim != claim:
                return False
            return True if done else event.model_copy(update={"claim": None})

        written = await self._call(
            lambda: self._change_event(event.account_id, event.id, write_back)
        )
        return written is True or isinstance(written, OutboxEvent)
