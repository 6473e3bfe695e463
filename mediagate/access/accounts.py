"""Accounts and API keys: SQLite (WAL) under ``MEDIAGATE_HOME``, or Redis.

Keys are random (240 bits) and stored only as a SHA-256 hash: with that much
entropy a fast hash cannot be reversed by guessing, and a lookup by hash is a
single indexed read. The key itself is shown once, when it is created.
Administration (the CLI) is synchronous; ``authenticate`` (every request) is a
coroutine. Both backends honour one contract, tested against both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
import sqlite3
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mediagate.protocol.clock import Clock, system_clock
from mediagate.stores.sqlite_connections import SqliteConnections

if TYPE_CHECKING:
    from mediagate.stores import StateConfig

KEY_PREFIX = "mg-"
PREFIX_LENGTH = len(KEY_PREFIX) + 8
# What a key may do beyond its account's own work: ``operator`` keys are for the
# operations view (every account's aggregate figures, the service's limits; issue 18).
ROLES = ("user", "operator")

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
    revoked_at REAL,
    role TEXT NOT NULL DEFAULT 'user'
);
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(30)


def new_account_id() -> str:
    return f"acct_{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    tier: str
    created_at: float
    # The role of the key that authenticated it (``ROLES``). An account has keys of
    # several roles, so this is set only on the ``Account`` that ``authenticate``
    # returns; one looked up by name (``get_account``) says ``user``: never authorise
    # on that.
    role: str = "user"


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    account: str
    tier: str
    created_at: float
    revoked: bool
    role: str = "user"


def checked_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; a key's role is one of {', '.join(ROLES)}")
    return role


class SqliteAccountStore:
    """Accounts and hashed API keys; a connection per thread, safe across processes."""

    def __init__(self, path: str | Path, *, clock: Clock = system_clock) -> None:
        self.path = Path(path)
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._connections = SqliteConnections(self.path, "PRAGMA foreign_keys=ON")
        with self._connect() as db:
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(api_keys)")}
            if "role" not in columns:  # a store made before keys had roles
                try:
                    db.execute("ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'user'")
                except sqlite3.OperationalError as error:  # another process added it first
                    if "duplicate column" not in str(error):
                        raise

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._connections.connection()

    def ensure_account(self, name: str, tier: str, *, created_at: float | None = None) -> Account:
        """The account called ``name``, created with ``tier`` if it does not exist yet.

        ``created_at`` backdates a new account (importing accounts from another system).
        """
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT id, name, tier, created_at FROM accounts WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                born = self._clock() if created_at is None else created_at
                row = (new_account_id(), name, tier, born)
                db.execute("INSERT INTO accounts VALUES (?, ?, ?, ?)", row)
            db.execute("COMMIT")
        return Account(*row)

    def get_account(self, name: str) -> Account | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT id, name, tier, created_at FROM accounts WHERE name = ?", (name,)
            ).fetchone()
        return Account(*row) if row else None

    def set_tier(self, name: str, tier: str) -> Account | None:
        """Move the account to ``tier``; ``None`` if there is no such account."""
        with self._connect() as db:
            db.execute("UPDATE accounts SET tier = ? WHERE name = ?", (tier, name))
        return self.get_account(name)

    def create_key(self, account_id: str, *, role: str = "user") -> str:
        """A new key for ``account_id`` with ``role``; only its hash is stored, the key is
        returned once."""
        checked_role(role)
        with self._connect() as db:
            while True:
                key = new_key()
                try:
                    db.execute(
                        "INSERT INTO api_keys (key_hash, prefix, account_id, created_at, role) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (hash_key(key), key[:PREFIX_LENGTH], account_id, self._clock(), role),
                    )
                except sqlite3.IntegrityError:
                    continue  # a prefix collision: draw again
                return key

    def list_keys(self) -> list[KeyInfo]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT k.prefix, a.name, a.tier, k.created_at, k.revoked_at IS NOT NULL, "
                "k.role FROM api_keys k JOIN accounts a ON a.id = k.account_id "
                "ORDER BY k.created_at"
            ).fetchall()
        return [
            KeyInfo(p, name, tier, created, bool(revoked), role)
            for p, name, tier, created, revoked, role in rows
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

        One indexed read, in a thread: a database another process holds busy (a
        checkpoint, a long write) must not stall the router's event loop.
        """
        if not key.startswith(KEY_PREFIX):
            return None
        return await asyncio.to_thread(self._account_by_key_hash, hash_key(key))

    def _account_by_key_hash(self, key_hash: str) -> Account | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT a.id, a.name, a.tier, a.created_at, k.role FROM api_keys k "
                "JOIN accounts a ON a.id = k.account_id "
                "WHERE k.key_hash = ? AND k.revoked_at IS NULL",
                (key_hash,),
            ).fetchone()
        return Account(*row) if row else None


class RedisAccountStore:
    """Accounts and hashed keys in Redis.

    ``mg:{a:<id>}:account`` (hash) holds an account, in its own hash slot with the
    account's jobs and ledger; ``mg:accounts:byname`` maps names to ids,
    ``mg:key:<sha256>`` holds a key's owner and state and ``mg:keys:byprefix``
    maps the shown prefix to the hash (for revocation).
    """

    BY_NAME = "mg:accounts:byname"
    BY_PREFIX = "mg:keys:byprefix"

    def __init__(self, url: str, *, clock: Clock = system_clock) -> None:
        import redis
        import redis.asyncio as redis_async

        from mediagate.stores.redis_store import blocking_pool

        self.url = url
        self._clock = clock
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)
        self._async: Any = redis_async.Redis(
            connection_pool=blocking_pool(url, decode_responses=True)
        )

    @staticmethod
    def _account_key(account_id: str) -> str:
        return f"mg:{{a:{account_id}}}:account"

    @staticmethod
    def _api_key(key_hash: str) -> str:
        return f"mg:key:{key_hash}"

    @staticmethod
    def _account(fields: dict[str, str]) -> Account:
        return Account(
            id=fields["id"],
            name=fields["name"],
            tier=fields["tier"],
            created_at=float(fields["created_at"]),
        )

    def ensure_account(self, name: str, tier: str, *, created_at: float | None = None) -> Account:
        candidate = new_account_id()
        if self._redis.hsetnx(self.BY_NAME, name, candidate):
            born = self._clock() if created_at is None else created_at
            fields = {"id": candidate, "name": name, "tier": tier, "created_at": repr(born)}
            self._redis.hset(self._account_key(candidate), mapping=fields)
            return self._account(fields)
        account = self.get_account(name)
        if account is None:  # its creator has not written it yet
            time.sleep(0.05)
            account = self.get_account(name)
        if account is None:
            raise RuntimeError(f"account {name} is half-created; try again")
        return account

    def get_account(self, name: str) -> Account | None:
        account_id = self._redis.hget(self.BY_NAME, name)
        if account_id is None:
            return None
        fields = self._redis.hgetall(self._account_key(account_id))
        return self._account(fields) if fields else None

    def set_tier(self, name: str, tier: str) -> Account | None:
        account = self.get_account(name)
        if account is None:
            return None
        self._redis.hset(self._account_key(account.id), "tier", tier)
        return self.get_account(name)

    def create_key(self, account_id: str, *, role: str = "user") -> str:
        checked_role(role)
        while True:
            key = new_key()
            prefix = key[:PREFIX_LENGTH]
            if not self._redis.hsetnx(self.BY_PREFIX, prefix, hash_key(key)):
                continue  # a prefix collision: draw again
            self._redis.hset(
                self._api_key(hash_key(key)),
                mapping={
                    "account_id": account_id,
                    "prefix": prefix,
                    "created_at": repr(self._clock()),
                    "role": role,
                },
            )
            return key

    def list_keys(self) -> list[KeyInfo]:
        infos = []
        for prefix, key_hash in self._redis.hgetall(self.BY_PREFIX).items():
            fields = self._redis.hgetall(self._api_key(key_hash))
            if not fields:
                continue
            account = self._redis.hgetall(self._account_key(fields["account_id"]))
            infos.append(
                KeyInfo(
                    prefix,
                    account.get("name", "?"),
                    account.get("tier", "?"),
                    float(fields["created_at"]),
                    "revoked_at" in fields,
                    fields.get("role", "user"),
                )
            )
        return sorted(infos, key=lambda info: info.created_at)

    def revoke(self, prefix: str) -> bool:
        prefix = prefix if prefix.startswith(KEY_PREFIX) else KEY_PREFIX + prefix
        key_hash = self._redis.hget(self.BY_PREFIX, prefix[:PREFIX_LENGTH])
        if key_hash is None:
            return False
        return bool(self._redis.hsetnx(self._api_key(key_hash), "revoked_at", repr(self._clock())))

    async def authenticate(self, key: str) -> Account | None:
        from mediagate.stores.redis_store import call_redis

        if not key.startswith(KEY_PREFIX):
            return None

        async def lookup() -> tuple[dict[str, str], str] | None:
            fields = await self._async.hgetall(self._api_key(hash_key(key)))
            if not fields or "revoked_at" in fields:
                return None
            account: dict[str, str] = await self._async.hgetall(
                self._account_key(fields["account_id"])
            )
            return account, fields.get("role", "user")

        found = await call_redis(self.url, lookup)
        if not found or not found[0]:
            return None
        return dataclasses.replace(self._account(found[0]), role=found[1])


AccountStore = SqliteAccountStore | RedisAccountStore


def open_account_store(config: StateConfig, *, clock: Clock = system_clock) -> AccountStore:
    """Accounts live in the same store as jobs and the quota ledger."""
    if config.backend == "redis":
        if not config.redis_url:
            raise ValueError("the redis state backend needs redis_url")
        return RedisAccountStore(config.redis_url, clock=clock)
    if not config.sqlite_path:
        raise ValueError("the sqlite state backend needs sqlite_path")
    return SqliteAccountStore(config.sqlite_path, clock=clock)
