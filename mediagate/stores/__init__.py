"""The state store: jobs now (accounts, keys and the quota ledger join them later).

``StateConfig`` is plain data that crosses Ray handles; every process opens its
own store from it with ``open_state_store``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from mediagate.protocol.errors import StoreUnavailable
from mediagate.stores.base import JobStore, ListOrder
from mediagate.stores.records import OutboxEvent, VideoJobRecord

__all__ = [
    "JobStore",
    "ListOrder",
    "OutboxEvent",
    "StateConfig",
    "StoreUnavailable",
    "VideoJobRecord",
    "given_or_opened",
    "open_state_store",
]

StoreT = TypeVar("StoreT")
ConfigT = TypeVar("ConfigT")


class StateConfig(BaseModel):
    """Which backend holds state: SQLite under MEDIAGATE_HOME, or Redis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["sqlite", "redis"] = Field("sqlite", description="Store backend.")
    sqlite_path: str | None = Field(None, description="SQLite file (backend sqlite).")
    redis_url: str | None = Field(None, description="redis:// URL (backend redis).")

    @classmethod
    def embedded(cls, path: str | Path) -> StateConfig:
        return cls(backend="sqlite", sqlite_path=str(path))


def given_or_opened(
    given: StoreT | None, config: ConfigT | None, open_store: Callable[[ConfigT], StoreT], what: str
) -> StoreT:
    """A deployment's store: the one a test handed in, else opened from its config."""
    if given is not None:
        return given
    if config is None:
        raise ValueError(f"a {what} config (or a {what} store) is needed")
    return open_store(config)


def open_state_store(config: StateConfig) -> JobStore:
    if config.backend == "redis":
        from mediagate.stores.redis_store import RedisStateStore

        if not config.redis_url:
            raise ValueError("the redis state backend needs redis_url")
        return RedisStateStore(config.redis_url)
    from mediagate.stores.sqlite_store import SqliteStateStore

    if not config.sqlite_path:
        raise ValueError("the sqlite state backend needs sqlite_path")
    return SqliteStateStore(config.sqlite_path)
