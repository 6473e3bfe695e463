"""The mediagate apps deployed on the test session's one local Ray instance (its
``ray_session`` and ``serve_port`` fixtures are in tests/conftest.py, shared with
tests/chaos).

- ``service``: the image model on the embedded default (SQLite, local files).
- ``video_service``: the video model, once per backend pair (SQLite + files, then
  a real redis-server + moto's S3 server), each as its own Serve application under
  its own route prefix. Only one video app exists at a time (two CPUs here).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mediagate.access.accounts import open_account_store
from mediagate.cli.model_apps import ROUTER_APP_IMPORT, WORKER_POLICY
from mediagate.stores import StateConfig
from mediagate.stores.artifacts import ArtifactConfig, s3_client
from tests.servers import free_port

if TYPE_CHECKING:
    from deployments.app import AppArgs

__all__ = ["RunningService", "free_port", "mediagate_up"]

MEDIAGATE = str(Path(sys.executable).with_name("mediagate"))


def write_unlimited_tiers(home: Path, *, keep_queue_caps: bool = False) -> Path:
    """The shipped tier file without daily quotas, rates and cooldowns (and queue caps,
    unless kept), so that only the scheduler decides what waits and what is shed."""
    import yaml

    from mediagate.access.tiers import shipped_tier_config

    tiers = shipped_tier_config()
    unlimited: dict[str, Any] = {
        "images_per_day": None,
        "images_per_minute": None,
        "cooldown": None,
    }
    if not keep_queue_caps:
        unlimited["max_queued"] = None
    for tier in tiers["tiers"].values():
        tier.update(unlimited)
    path = home / "tiers.yaml"
    path.write_text(yaml.safe_dump(tiers))
    return path


def write_up_config(path: Path, args: dict[str, Any], deployments: list[dict[str, Any]]) -> Path:
    """A Serve config for `mediagate up --config` at ``path``: the router's application
    (its import path and the worker autoscaling policy, as `up` deploys them) with
    ``args`` and the given per-deployment entries."""
    import yaml

    config = {
        "proxy_location": "HeadOnly",
        "applications": [
            {
                "name": "mediagate",
                "route_prefix": "/",
                "import_path": ROUTER_APP_IMPORT,
                "autoscaling_policy": dict(WORKER_POLICY),
                "args": args,
                "deployments": deployments,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_tiny_sd_config(home: Path, tiers_file: Path) -> Path:
    """A Serve config for `mediagate up` serving tiny-sd alone (its worker asks for no
    CPU, leaving the machine's for models added later) under ``tiers_file``."""
    return write_up_config(
        home / "serve.tiny-sd.yaml",
        {"models": ["tiny-sd"], "tiers_file": str(tiers_file)},
        [{"name": "TextToImage-tiny-sd", "ray_actor_options": {"num_cpus": 0, "num_gpus": 0}}],
    )


def deployments_of(details: dict[str, Any]) -> dict[str, Any]:
    """Every deployment of every application in Serve's application details, by name
    (`mediagate up` serves each model as an application of its own)."""
    return {
        name: deployment
        for app in (details.get("applications") or {}).values()
        for name, deployment in (app.get("deployments") or {}).items()
    }


def mediagate_up(env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    """`mediagate up --detach OPTIONS...` as a newcomer runs it (its own process)."""
    return subprocess.run(
        [MEDIAGATE, "up", "--detach", *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@dataclass(frozen=True)
class RunningService:
    base_url: str
    home: Path
    key: str
    app_name: str = "mediagate"
    other_key: str = ""
    state: StateConfig | None = field(default=None, repr=False)
    artifacts: ArtifactConfig | None = field(default=None, repr=False)


def _keys(state: StateConfig) -> tuple[str, str]:
    store = open_account_store(state)
    key = store.create_key(store.ensure_account("integration", "pro").id)
    other = store.create_key(store.ensure_account("someone-else", "pro").id)
    return key, other


@pytest.fixture(scope="session")
def service(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> RunningService:
    from ray import serve

    from deployments.app import AppArgs, build_app

    home = tmp_path_factory.mktemp("mediagate-home")
    args = AppArgs(
        home=str(home),
        models=["tiny-sd"],
        worker_ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    )
    serve.run(build_app(args), name="mediagate", route_prefix="/")
    key, other = _keys(StateConfig.embedded(home / "state.db"))
    return RunningService(
        base_url=f"http://127.0.0.1:{serve_port}", home=home, key=key, other_key=other
    )


def video_app_args(home: Path, state: StateConfig, artifacts: ArtifactConfig) -> AppArgs:
    from deployments.app import AppArgs

    return AppArgs(
        home=str(home),
        models=["tiny-wan"],
        worker_ray_actor_options={"num_cpus": 1, "num_gpus": 0},
        state=state,
        artifacts=artifacts,
        router={"poll_after_ms": 100, "artifact_sweep_s": 1},
        video={"lease_s": 3, "reconcile_s": 0.5, "max_attempts": 2},
        # the tests' receivers listen on loopback; a lost sender's events move on quickly
        webhooks={
            "allowed_networks": ["127.0.0.1/32"],
            "retry_delays_s": [0.5, 0.5, 0.5],
            "claim_hold_s": 3,
            "poll_interval_s": 0.2,
        },
    )


def deploy_video_app(name: str, home: Path, state: StateConfig, artifacts: ArtifactConfig) -> None:
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(video_app_args(home, state, artifacts)), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="session", params=["embedded", "redis-s3"])
def video_service(
    request: pytest.FixtureRequest, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    from ray import serve

    home = tmp_path_factory.mktemp(f"video-{request.param}")
    if request.param == "embedded":
        state = StateConfig.embedded(home / "state.db")
        artifacts = ArtifactConfig(
            backend="local",
            root=str(home / "artifacts"),
            secret_path=str(home / "secrets" / "url_signing_key"),
        )
    else:
        redis_url: str = request.getfixturevalue("redis_url")
        endpoint: str = request.getfixturevalue("s3_endpoint")
        bucket = f"videos-{uuid.uuid4().hex[:8]}"
        s3_client(endpoint_url=endpoint, region="us-east-1").create_bucket(Bucket=bucket)
        # A database of its own: this session-scoped app (its video scheduler reconciles
        # `tiny-wan` jobs every 2 s) may outlive the integration tests, and the unit tests
        # flush and fill database 0 of the same server with `tiny-wan` jobs.
        state = StateConfig(backend="redis", redis_url=redis_url.rsplit("/", 1)[0] + "/1")
        artifacts = ArtifactConfig(
            backend="s3", s3_bucket=bucket, s3_endpoint_url=endpoint, s3_region="us-east-1"
        )
    name = f"video-{request.param}"
    deploy_video_app(name, home, state, artifacts)
    key, other = _keys(state)
    yield RunningService(
        base_url=f"http://127.0.0.1:{serve_port}/{name}",
        home=home,
        key=key,
        app_name=name,
        other_key=other,
        state=state,
        artifacts=artifacts,
    )
    serve.delete(name)
