"""Accounts and API keys in SQLite (WAL) under ``MEDIAGATE_HOME``.

Keys are random (240 bits) and stored only as a SHA-256 hash: with that much
entropy a fast hash cannot be reversed by guessing, and a lookup by hash is a
single indexed read. The key itself is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "mg-"
PREFIX_LENGTH = len(KEY_PREFIX) + 8
DEFAULT_TIERS = ("free", "plus", "pro")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    tier TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    prefix TEXT UNIQUE NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(30)


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    tier: str
    created_at: float


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    account: str
    tier: str
    created_at: float
    revoked: bool


class SqliteAccountStore:
    """Accounts and hashed API keys; one connection per call, safe across processes."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    def ensure_account(self, name: str, tier: str) -> Account:
        """The account called ``name``, created with ``tier`` if it does not exist yet."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT id, name, tier, created_at FROM accounts WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                row = (f"acct_{uuid.uuid4().hex[:16]}", name, tier, self._clock())
                db.execute("INSERT INTO accounts VALUES (?, ?, ?, ?)", row)
            db.execute("COMMIT")
        return Account(*row)

    def create_key(self, account_id: str) -> str:
        """A new key for ``account_id``; only its hash is stored, the key is returned once."""
        with self._connect() as db:
            while True:
                key = new_key()
                try:
                    db.execute(
                        "INSERT INTO api_keys (key_hash, prefix, account_id, created_at) "
                        "VALUES (?, ?, ?, ?)",
                        (hash_key(key), key[:PREFIX_LENGTH], account_id, self._clock()),
                    )
                except sqlite3.IntegrityError:
                    continue  # a prefix collision: draw again
                return key

    def list_keys(self) -> list[KeyInfo]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT k.prefix, a.name, a.tier, k.created_at, k.revoked_at IS NOT NULL "
                "FROM api_keys k JOIN accounts a ON a.id = k.account_id ORDER BY k.created_at"
            ).fetchall()
        return [
            KeyInfo(p, name, tier, created, bool(revoked))
            for p, name, tier, created, revoked in rows
        ]

    def revoke(self, prefix: str) -> bool:
        """Revoke the key starting with ``prefix``; ``False`` when no live key matches."""
        prefix = prefix if prefix.startswith(KEY_PREFIX) else KEY_PREFIX + prefix
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE prefix = ? AND revoked_at IS NULL",
                (self._clock(), prefix[:PREFIX_LENGTH]),
            )
        return cursor.rowcount == 1

    async def authenticate(self, key: str) -> Account | None:
        """The account owning a live ``key``, or ``None``.

        A single indexed read on a local file: fast enough to run on the event loop.
        """
        if not key.startswith(KEY_PREFIX):
            return None
        with self._connect() as db:
            row = db.execute(
                "SELECT a.id, a.name, a.tier, a.created_at FROM api_keys k "
                "JOIN accounts a ON a.id = k.account_id "
                "WHERE k.key_hash = ? AND k.revoked_at IS NULL",
                (hash_key(key),),
            ).fetchone()
        return Account(*row) if row else None
