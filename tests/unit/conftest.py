"""Fixtures shared by the unit tests that run one contract against both state backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from mediagate.stores import StateConfig


@pytest.fixture(params=["sqlite", "redis"])
def state_config(request: pytest.FixtureRequest, tmp_path: Path) -> StateConfig:
    """SQLite in a fresh file, or the session's real redis-server, flushed."""
    if request.param == "sqlite":
        return StateConfig.embedded(tmp_path / "state.db")
    import redis

    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    return StateConfig(backend="redis", redis_url=url)
