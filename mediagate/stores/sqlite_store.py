"""The embedded state store: SQLite in WAL mode under ``MEDIAGATE_HOME``.

Several processes (router, scheduler, worker replicas) share the file. Each
compare-and-set runs in a ``BEGIN IMMEDIATE`` transaction, which takes SQLite's
write lock before reading, so a read-check-write is atomic across processes.
Calls run in a worker thread so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from mediagate.stores.base import DocumentChange, ListOrder, T
from mediagate.stores.records import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    OutboxEvent,
    VideoJobRecord,
)
from mediagate.stores.sqlite_connections import SqliteConnections

_SCHEMA = """
CREATE TABLE IF NOT EXISTS video_jobs (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS video_jobs_by_account ON video_jobs (account_id, created_at, id);
CREATE INDEX IF NOT EXISTS video_jobs_by_model ON video_jobs (model, status, created_at);
CREATE INDEX IF NOT EXISTS video_jobs_by_expiry ON video_jobs (expires_at);
CREATE TABLE IF NOT EXISTS account_docs (
    account_id TEXT NOT NULL,
    name TEXT NOT NULL,
    doc TEXT NOT NULL,
    expires_at REAL,
    PRIMARY KEY (account_id, name)
);
CREATE INDEX IF NOT EXISTS account_docs_by_expiry ON account_docs (expires_at);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    due_at REAL NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_due ON outbox (due_at);
"""


class SqliteStateStore:
    """``JobStore`` on one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._connections = SqliteConnections(self.path, "PRAGMA synchronous=NORMAL")
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._connections.connection()

    @staticmethod
    def _row(job: VideoJobRecord) -> tuple[Any, ...]:
        return (
            job.id,
            job.account_id,
            job.model,
            job.status,
            job.created_at,
            job.expires_at,
            job.model_dump_json(),
        )

    async def create_job(self, job: VideoJobRecord) -> None:
        def insert() -> None:
            with self._connect() as db:
                db.execute("INSERT INTO video_jobs VALUES (?, ?, ?, ?, ?, ?, ?)", self._row(job))

        await asyncio.to_thread(insert)

    async def get_job(self, account_id: str, job_id: str) -> VideoJobRecord | None:
        def read() -> VideoJobRecord | None:
            with self._connect() as db:
                row = db.execute(
                    "SELECT doc FROM video_jobs WHERE id = ? AND account_id = ?",
                    (job_id, account_id),
                ).fetchone()
            return VideoJobRecord.model_validate_json(row[0]) if row else None

        return await asyncio.to_thread(read)

    async def list_jobs(
        self, account_id: str, *, after: str | None, limit: int, order: ListOrder
    ) -> tuple[list[VideoJobRecord], bool]:
        direction = "ASC" if order == "asc" else "DESC"
        compare = ">" if order == "asc" else "<"

        def read() -> tuple[list[VideoJobRecord], bool]:
            with self._connect() as db:
                params: list[Any] = [account_id]
                where = "account_id = ?"
                if after is not None:
                    anchor = db.execute(
                        "SELECT created_at FROM video_jobs WHERE id = ? AND account_id = ?",
                        (after, account_id),
                    ).fetchone()
                    if anchor is None:
                        return [], False
                    where += f" AND (created_at, id) {compare} (?, ?)"
                    params += [anchor[0], after]
                rows = db.execute(
                    f"SELECT doc FROM video_jobs WHERE {where} "
                    f"ORDER BY created_at {direction}, id {direction} LIMIT ?",
                    (*params, limit + 1),
                ).fetchall()
            jobs = [VideoJobRecord.model_validate_json(row[0]) for row in rows[:limit]]
            return jobs, len(rows) > limit

        return await asyncio.to_thread(read)

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
        def compare_and_set() -> VideoJobRecord | None:
            # Committed only at the end: a refusal or an error leaves nothing written
            # (the connection rolls an open transaction back), the job and its events
            # go together.
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute(
                    "SELECT doc FROM video_jobs WHERE id = ? AND account_id = ?",
                    (job_id, account_id),
                ).fetchone()
                if row is None:
                    return None
                job = VideoJobRecord.model_validate_json(row[0])
                if job.status not in expect_status or (
                    expect_attempt is not None and job.attempt != expect_attempt
                ):
                    return None
                updated = VideoJobRecord.model_validate({**job.model_dump(), **changes})
                db.execute(
                    "UPDATE video_jobs SET status = ?, expires_at = ?, doc = ? WHERE id = ?",
                    (updated.status, updated.expires_at, updated.model_dump_json(), job_id),
                )
                db.executemany(
                    "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?)",
                    [
                        (event.id, event.account_id, event.due_at, event.model_dump_json())
                        for event in events
                    ],
                )
                db.execute("COMMIT")
                return updated

        return await asyncio.to_thread(compare_and_set)

    async def delete_job(self, account_id: str, job_id: str) -> VideoJobRecord | None:
        def delete() -> VideoJobRecord | None:
            with self._connect() as db:
                row = db.execute(
                    "DELETE FROM video_jobs WHERE id = ? AND account_id = ? RETURNING doc",
                    (job_id, account_id),
                ).fetchone()
            return VideoJobRecord.model_validate_json(row[0]) if row else None

        return await asyncio.to_thread(delete)

    async def active_jobs(self, model: str) -> list[VideoJobRecord]:
        def read() -> list[VideoJobRecord]:
            marks = ",".join("?" * len(ACTIVE_STATUSES))
            with self._connect() as db:
                rows = db.execute(
                    f"SELECT doc FROM video_jobs WHERE model = ? AND status IN ({marks}) "
                    "ORDER BY created_at, id",
                    (model, *ACTIVE_STATUSES),
                ).fetchall()
            return [VideoJobRecord.model_validate_json(row[0]) for row in rows]

        return await asyncio.to_thread(read)

    async def expired_jobs(self, now: float, limit: int = 100) -> list[VideoJobRecord]:
        def read() -> list[VideoJobRecord]:
            marks = ",".join("?" * len(FINAL_STATUSES))
            with self._connect() as db:
                rows = db.execute(
                    f"SELECT doc FROM video_jobs WHERE expires_at <= ? AND status IN ({marks}) "
                    "ORDER BY expires_at LIMIT ?",
                    (now, *FINAL_STATUSES, limit),
                ).fetchall()
            return [VideoJobRecord.model_validate_json(row[0]) for row in rows]

        return await asyncio.to_thread(read)

    async def due_events(self, now: float, limit: int = 100) -> list[OutboxEvent]:
        def read() -> list[OutboxEvent]:
            with self._connect() as db:
                rows = db.execute(
                    "SELECT doc FROM outbox WHERE due_at <= ? ORDER BY due_at LIMIT ?",
                    (now, limit),
                ).fetchall()
            return [OutboxEvent.model_validate_json(row[0]) for row in rows]

        return await asyncio.to_thread(read)

    async def claim_event(
        self, account_id: str, event_id: str, *, now: float, claim: str, hold_s: float
    ) -> OutboxEvent | None:
        def take() -> OutboxEvent | None:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute(
                    "SELECT doc FROM outbox WHERE id = ? AND account_id = ? AND due_at <= ?",
                    (event_id, account_id, now),
                ).fetchone()
                if row is None:
                    return None
                event = OutboxEvent.model_validate_json(row[0]).model_copy(
                    update={"claim": claim, "due_at": now + hold_s}
                )
                db.execute(
                    "UPDATE outbox SET due_at = ?, doc = ? WHERE id = ?",
                    (event.due_at, event.model_dump_json(), event_id),
                )
                db.execute("COMMIT")
                return event

        return await asyncio.to_thread(take)

    async def finish_event(self, event: OutboxEvent, *, claim: str, done: bool) -> bool:
        def write_back() -> bool:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute(
                    "SELECT doc FROM outbox WHERE id = ? AND account_id = ?",
                    (event.id, event.account_id),
                ).fetchone()
                if row is None or OutboxEvent.model_validate_json(row[0]).claim != claim:
                    return False
                if done:
                    db.execute("DELETE FROM outbox WHERE id = ?", (event.id,))
                else:
                    released = event.model_copy(update={"claim": None})
                    db.execute(
                        "UPDATE outbox SET due_at = ?, doc = ? WHERE id = ?",
                        (released.due_at, released.model_dump_json(), event.id),
                    )
                db.execute("COMMIT")
                return True

        return await asyncio.to_thread(write_back)

    async def mutate(
        self, account_id: str, name: str, change: DocumentChange[T], *, ttl_s: float | None = None
    ) -> T:
        def transaction() -> T:
            now = time.time()
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    row = db.execute(
                        "SELECT doc, expires_at FROM account_docs "
                        "WHERE account_id = ? AND name = ?",
                        (account_id, name),
                    ).fetchone()
                    current = row[0] if row and (row[1] is None or row[1] > now) else None
                    updated, result = change(current)
                    if updated is None:
                        db.execute(
                            "DELETE FROM account_docs WHERE account_id = ? AND name = ?",
                            (account_id, name),
                        )
                    elif updated != current:
                        expires_at = now + ttl_s if ttl_s is not None else None
                        db.execute(
                            "INSERT OR REPLACE INTO account_docs VALUES (?, ?, ?, ?)",
                            (account_id, name, updated, expires_at),
                        )
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # a failed COMMIT may have ended it already
                        db.execute("ROLLBACK")
                    raise
            return result

        return await asyncio.to_thread(transaction)

    async def purge_expired_documents(self, limit: int = 10_000) -> int:
        """Expired documents are unreadable at once (``mutate`` ignores them) but stay on
        disk until this runs (the router's sweep calls it)."""

        def purge() -> int:
            with self._connect() as db:
                removed = db.execute(
                    "DELETE FROM account_docs WHERE rowid IN (SELECT rowid FROM account_docs "
                    "WHERE expires_at <= ? LIMIT ?)",
                    (time.time(), limit),
                ).rowcount
            return int(removed)

        return await asyncio.to_thread(purge)

    async def close(self) -> None:
        """Nothing to release: connections live for one call."""
