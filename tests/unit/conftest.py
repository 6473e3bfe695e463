"""Fixtures shared by unit tests: one contract against both state backends, and one
cache of tiny models (each is built once per session, not once per test module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mediagate.stores import StateConfig


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where workers build and then load their tiny pipelines."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(params=["sqlite", "redis"])
def state_config(request: pytest.FixtureRequest, tmp_path: Path) -> StateConfig:
    """SQLite in a fresh file, or the session's real redis-server, flushed."""
    if request.param == "sqlite":
        return StateConfig.embedded(tmp_path / "state.db")
    import redis

    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    return StateConfig(backend="redis", redis_url=url)
