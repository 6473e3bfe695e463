"""A Redis outage mid-run, the official openai client against an exhausted quota, and a
live reload of the tier policy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from mediagate.access.accounts import open_account_store
from mediagate.stores import StateConfig, open_state_store
from mediagate.stores.artifacts import ArtifactConfig
from tests.servers import free_port, redis_server
from tests.unit.harness import Service


async def post(service: Service, body: dict[str, Any], auth: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=service.client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/v1/images/generations", json=body, headers=auth)


async def test_redis_stopped_mid_run(tmp_path: Path) -> None:
    with redis_server() as server:
        config = StateConfig(backend="redis", redis_url=server.url)
        service = Service(
            tmp_path, jobs=open_state_store(config), accounts=open_account_store(config)
        )
        free = service.other_auth("free-user", "free")
        plus = service.other_auth("plus-user", "plus", age_days=30)
        never_seen = service.other_auth("latecomer", "plus", age_days=30)
        assert (await post(service, {"prompt": "x"}, free)).status_code == 200
        assert (await post(service, {"prompt": "x"}, plus)).status_code == 200
        counters = service.gateway.guard.counters
        assert not {name for name in counters if name.startswith("store_outage")}, counters

        server.stop()  # the store goes away while the service runs
        with pytest.raises(redis.exceptions.ConnectionError):  # it is really gone
            redis.Redis.from_url(server.url, socket_connect_timeout=1).ping()
        for _ in range(3):
            refused = await post(service, {"prompt": "x"}, free)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "store_unavailable"
            assert int(refused.headers["retry-after"]) >= 1
        # Paid: admitted from a bounded local budget (5 images a minute for plus), then 503.
        statuses = [(await post(service, {"prompt": "x"}, plus)).status_code for _ in range(7)]
        assert statuses == [200] * 5 + [503] * 2
        # A key this replica never saw cannot be checked at all: 503, not 500 or 401.
        assert (await post(service, {"prompt": "x"}, never_seen)).status_code == 503
        assert counters["store_outage_fail_open"] == 5
        assert counters["store_outage_fail_closed"] == 5


class CountingApp:
    """ASGI wrapper counting the requests that reach the server."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Service, CountingApp, str]]:
    import uvicorn

    service = Service(tmp_path)
    counting = CountingApp(service.client.app)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(counting, host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield service, counting, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def test_openai_client_sees_insufficient_quota_and_does_not_retry(
    served: tuple[Service, CountingApp, str],
) -> None:
    service, counting, base_url = served
    key = service.accounts.create_key(service.accounts.ensure_account("freebie", "free").id)
    client = openai.OpenAI(base_url=base_url, api_key=key)  # default: 2 retries
    for _ in range(3):
        client.images.generate(prompt="x")
    assert counting.requests == 3
    with pytest.raises(openai.RateLimitError) as refused:
        client.images.generate(prompt="x")
    assert refused.value.code == "insufficient_quota"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert counting.requests == 4  # the client did not retry


async def test_tier_policy_reloads_live(tmp_path: Path) -> None:
    from deployments.router.deployment import Router

    home = tmp_path / "home"
    router = Router(
        {},
        home=str(home),
        state=StateConfig.embedded(home / "state.db"),
        artifacts=ArtifactConfig(
            backend="local", root=str(home / "files"), secret_path=str(home / "k")
        ),
    )
    assert router.gateway.policy.tiers["free"].images_per_day == 3
    from mediagate.access.tiers import load_tier_policy

    data = load_tier_policy().model_dump()
    data["tiers"]["free"]["images_per_day"] = 10
    await router.reconfigure({"tiers": data})
    assert router.gateway.policy.tiers["free"].images_per_day == 10
    await router.reconfigure({"tiers_file": None})  # nothing given: nothing changes
    assert router.gateway.policy.tiers["free"].images_per_day == 10
