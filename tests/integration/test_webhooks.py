"""Webhooks on a real Serve application, on both backend pairs (SQLite + files, Redis +
S3): a receiver on loopback (allowed by the test application's setting) gets
``video.completed`` for a finished job, which the official client's ``unwrap`` accepts;
killing the sender's replica mid-delivery loses nothing: its replacement sends the
same event again, with the same ``webhook-id``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from mediagate.access.accounts import open_account_store
from tests.integration.conftest import RunningService
from tests.servers import WebhookReceiver


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.close()


def registered_client(service: RunningService, url: str) -> openai.OpenAI:
    """The official client of a new pro account with one endpoint, at ``url``: each test
    sees only its own videos' events (the test account's videos from other tests may
    finish at any time, and their events rightly go to that account's endpoints)."""
    assert service.state is not None
    store = open_account_store(service.state)
    key = store.create_key(store.ensure_account(f"hooked-{uuid.uuid4().hex[:8]}", "pro").id)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=f"{service.base_url}/v1", headers=headers, timeout=30) as http:
        refused = http.post("/webhooks", json={"url": "http://169.254.169.254/latest/"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "url"
        created = http.post("/webhooks", json={"url": url})
        assert created.status_code == 200, created.text
    return openai.OpenAI(
        base_url=f"{service.base_url}/v1",
        api_key=key,
        webhook_secret=created.json()["secret"],
        max_retries=0,
    )


def test_a_finished_video_is_delivered_signed(
    video_service: RunningService, receiver: WebhookReceiver
) -> None:
    client = registered_client(video_service, receiver.url)
    video = client.videos.create_and_poll(prompt="a hooked fish", poll_interval_ms=100)
    assert video.status == "completed"
    [hook] = receiver.wait_for(1)
    event: Any = client.webhooks.unwrap(hook.body, hook.headers)
    assert (event.type, event.data.id) == ("video.completed", video.id)
    assert hook.headers["webhook-id"] == event.id


def test_killing_the_sender_mid_delivery_loses_nothing(
    video_service: RunningService, receiver: WebhookReceiver
) -> None:
    import ray

    client = registered_client(video_service, receiver.url)
    receiver.hold_next.set()  # the first attempt gets no answer
    video = client.videos.create_and_poll(prompt="a kept promise", poll_interval_ms=100)
    assert video.status == "completed"
    receiver.wait_for(1)
    [replica] = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if f"{video_service.app_name}#Webhooks" in actor["name"]
    ]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    killed_at = time.monotonic()
    # The first attempt is never answered (the receiver holds it until the test ends):
    # answering it while the killed process still lives, which Ray reports dead before
    # its process is gone, would let it record the delivery (then delivered once: right).

    # Serve replaces the replica; the new sender takes the event up once the dead one's
    # claim (3 s here) has run out, and sends it again.
    first, again = receiver.wait_for(2, timeout_s=120)[:2]
    assert again.headers["webhook-id"] == first.headers["webhook-id"]
    assert again.body == first.body
    event: Any = client.webhooks.unwrap(again.body, again.headers)
    assert (event.type, event.data.id) == ("video.completed", video.id)
    assert time.monotonic() - killed_at >= 1  # not before the replacement took it up
