from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.servers import MOTO_CREDENTIALS, free_port, moto_s3_server, redis_server

# The developer's own mediagate settings (MEDIAGATE_REDIS_URL, MEDIAGATE_S3_*,
# MEDIAGATE_HOME, MEDIAGATE_TIERS_FILE, ...) must not reach the tests: the test apps
# would talk to a real Redis or bucket. Cleared before anything reads the settings,
# and before any Ray worker starts (workers inherit this environment). Tests that
# want a setting give it themselves (monkeypatch, or a subprocess's env).
for _name in [name for name in os.environ if name.startswith("MEDIAGATE_")]:
    del os.environ[_name]

# Fake AWS credentials for moto, set before any Ray worker starts so that workers
# (which inherit this environment) can sign their S3 requests too.
for _name, _value in MOTO_CREDENTIALS.items():
    os.environ.setdefault(_name, _value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run tests that start their own Ray cluster (marked `own_ray_cluster`) first.

    `mediagate down` ends with `ray stop`, which stops every Ray process on the
    machine, so those tests must finish before the shared session cluster starts.
    """
    items.sort(key=lambda item: 0 if item.get_closest_marker("own_ray_cluster") else 1)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free port for the whole session."""
    with redis_server() as server:
        yield server.url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free port for the whole session; AWS credentials are fakes."""
    with moto_s3_server() as server:
        yield server.endpoint_url


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    from mediagate.cli.service import stop_own_ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    stop_own_ray()


@pytest.fixture(scope="session")
def serve_port(ray_session: None) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port
