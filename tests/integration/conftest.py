"""One local Ray instance and one deployed mediagate app for the whole test session."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mediagate.accounts import SqliteAccountStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RunningService:
    base_url: str
    home: Path
    key: str


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> RunningService:
    from ray import serve

    from deployments.app import AppArgs, build_app

    home = tmp_path_factory.mktemp("mediagate-home")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(home=str(home), worker_ray_actor_options={"num_cpus": 1, "num_gpus": 0})
    serve.run(build_app(args), name="mediagate", route_prefix="/")
    store = SqliteAccountStore(home / "state.db")
    key = store.create_key(store.ensure_account("integration", "pro").id)
    return RunningService(base_url=f"http://127.0.0.1:{port}", home=home, key=key)
