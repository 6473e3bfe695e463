"""Webhook delivery against a real HTTP receiver on loopback (allowed by the test's
setting), on both state stores: signed as Standard Webhooks and accepted by the
official client's ``webhooks.unwrap``; retried with the same ``webhook-id`` until a
2xx; given up (and the endpoint disabled) on 410 or when the schedule runs out; never
sent to an address the operator has not allowed; carried on by another sender when
one dies mid-delivery."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from mediagate.jobs.video import VideoJobLifecycle
from mediagate.protocol.clock import Clock, system_clock
from mediagate.protocol.errors import InvalidRequest
from mediagate.protocol.webhooks import WebhookEndpointCreate
from mediagate.stores import JobStore, StateConfig, open_state_store
from mediagate.webhooks.endpoints import DOCUMENT, EndpointBook, StoredEndpoint, new_secret
from mediagate.webhooks.sender import CLOCK_SKEW_S, WebhookSender
from mediagate.webhooks.settings import WebhookSettings
from tests.servers import WebhookReceiver
from tests.unit.test_state_store import job

ACCOUNT = "acct-a"
LOOPBACK = WebhookSettings(
    allowed_networks=("127.0.0.1/32",),
    retry_delays_s=(0.05, 0.05, 0.05, 0.05),
    timeout_s=2,
    claim_hold_s=0.5,
)


@pytest.fixture
async def store(state_config: StateConfig) -> AsyncIterator[JobStore]:
    job_store = open_state_store(state_config)
    yield job_store
    await job_store.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.close()


async def finish(
    store: JobStore, job_id: str, *, ok: bool = True, clock: Clock = system_clock
) -> None:
    """A running job of ACCOUNT, then completed (or failed) through its lifecycle."""
    await store.create_job(job(job_id, ACCOUNT, status="in_progress", attempt=1))
    lifecycle = VideoJobLifecycle(store, clock=clock)
    if ok:
        await lifecycle.complete(ACCOUNT, job_id, 1, artifacts={}, content_ttl_s=60)
    else:
        await lifecycle.fail(ACCOUNT, job_id, 1, message="boom", content_ttl_s=60)


async def deliver_all(sender: WebhookSender, timeout_s: float = 10) -> None:
    """Poll until the outbox is empty."""
    deadline = time.monotonic() + timeout_s
    while await sender.store.due_events(now=time.time() + 3600):
        assert time.monotonic() < deadline, "the outbox did not empty"
        await sender.poll_once()
        await asyncio.sleep(0.02)


def unwrap(secret: str, hook: Any) -> Any:
    client = openai.OpenAI(api_key="unused", webhook_secret=secret)
    return client.webhooks.unwrap(hook.body, hook.headers)


async def test_a_finished_video_reaches_the_endpoint_signed(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    sender = WebhookSender(store, LOOPBACK)
    endpoint = await sender.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))
    assert endpoint.secret is not None and endpoint.secret.startswith("whsec_")
    await finish(store, "video_ok")
    await deliver_all(sender)

    [hook] = receiver.received
    event = unwrap(endpoint.secret, hook)
    assert event.type == "video.completed" and event.data.id == "video_ok"
    assert hook.headers["webhook-id"] == event.id and event.id.startswith("evt_")
    assert hook.headers["content-type"] == "application/json"
    assert abs(int(hook.headers["webhook-timestamp"]) - time.time()) < 30
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(new_secret(), hook)  # someone else's secret does not verify
    assert sender.counts["delivered"] == 1


async def test_retried_with_the_same_id_until_the_fourth_try_succeeds(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    receiver.answers = [500, 500, 500]
    sender = WebhookSender(store, LOOPBACK)
    endpoint = await sender.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))
    await finish(store, "video_ok")
    await deliver_all(sender)

    hooks = receiver.received
    assert len(hooks) == 4
    assert len({hook.headers["webhook-id"] for hook in hooks}) == 1
    assert len({hook.body for hook in hooks}) == 1  # the very same bytes each time
    for hook in hooks:
        assert unwrap(endpoint.secret or "", hook).data.id == "video_ok"
    [stored] = await sender.endpoints.list(ACCOUNT)
    assert stored.status == "enabled" and stored.failing_since is None
    assert (sender.counts["failed"], sender.counts["delivered"]) == (3, 1)


async def test_only_the_events_asked_for(store: JobStore, receiver: WebhookReceiver) -> None:
    sender = WebhookSender(store, LOOPBACK)
    secret = (
        await sender.endpoints.add(
            ACCOUNT, WebhookEndpointCreate(url=receiver.url, events=["video.failed"])
        )
    ).secret
    await finish(store, "video_ok")
    await finish(store, "video_bad", ok=False)
    await deliver_all(sender)
    [hook] = receiver.received
    event = unwrap(secret or "", hook)
    assert (event.type, event.data.id) == ("video.failed", "video_bad")


async def test_410_disables_the_endpoint_at_once(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    receiver.answers = [410]
    sender = WebhookSender(store, LOOPBACK)
    await sender.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))
    await finish(store, "video_1")
    await deliver_all(sender)
    [stored] = await sender.endpoints.list(ACCOUNT)
    assert stored.status == "disabled" and "410" in (stored.disabled_reason or "")
    await finish(store, "video_2")
    await deliver_all(sender)
    assert len(receiver.received) == 1  # nothing more to a disabled endpoint


async def test_an_endpoint_failing_the_whole_schedule_is_disabled(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    receiver.answers = [503] * 20
    settings = LOOPBACK.model_copy(update={"retry_delays_s": (0.05, 0.05)})
    sender = WebhookSender(store, settings)
    await sender.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))
    await finish(store, "video_1")
    await deliver_all(sender)
    assert len(receiver.received) == 3  # the first attempt and two retries
    [stored] = await sender.endpoints.list(ACCOUNT)
    assert stored.status == "disabled"
    assert "3 attempts failed" in (stored.disabled_reason or "")
    assert "503" in (stored.disabled_reason or "")


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "http://[::1]:8080/hook",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
        "ftp://example.com/hook",
        "http://user:pass@example.com/hook",
        "http://name.invalid/hook",
        "not a url",
        "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of 169.254.169.254
        "http://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
        "http://[::7f00:1]/hook",  # IPv4-compatible 127.0.0.1
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook",  # Teredo
        "http://167772161/hook",  # 10.0.0.1 spelled as a number
    ],
)
async def test_targets_refused_at_registration(store: JobStore, url: str) -> None:
    endpoints = WebhookSender(store, LOOPBACK).endpoints  # loopback 127.0.0.1 only
    with pytest.raises(InvalidRequest) as refused:
        await endpoints.add(ACCOUNT, WebhookEndpointCreate(url=url))
    assert refused.value.param == "url"
    assert await endpoints.list(ACCOUNT) == []


async def test_loopback_needs_the_operators_setting(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    by_default = WebhookSender(store, WebhookSettings()).endpoints
    for url in (receiver.url, f"http://localhost:{receiver.port}/hooks"):
        with pytest.raises(InvalidRequest, match="loopback") as refused:
            await by_default.add(ACCOUNT, WebhookEndpointCreate(url=url))
        # what a name resolves to is not told (registration is no DNS oracle)
        assert "127.0.0.1" not in refused.value.message or "127.0.0.1" in url
    added = await WebhookSender(store, LOOPBACK).endpoints.add(
        ACCOUNT, WebhookEndpointCreate(url=receiver.url)
    )
    assert added.status == "enabled"


@pytest.mark.parametrize("url", ["http://169.254.169.254/hook", "http://10.0.0.1/hook"])
async def test_targets_refused_at_delivery_get_nothing(store: JobStore, url: str) -> None:
    """An endpoint stored as if its name had resolved to a public address at
    registration: at delivery its address is checked again, and nothing is sent."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    def mock_client(settings: WebhookSettings) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(record))

    stored = StoredEndpoint(
        id="wh_x", url=url, events=["video.completed"], secret=new_secret(), created_at=0
    )
    await store.mutate(ACCOUNT, DOCUMENT, lambda _: (EndpointBook(endpoints=[stored]).text(), None))
    settings = LOOPBACK.model_copy(update={"retry_delays_s": (0.01,)})
    sender = WebhookSender(store, settings, new_client=mock_client)
    await finish(store, "video_1")
    await deliver_all(sender)
    assert sent == []
    [after] = await sender.endpoints.list(ACCOUNT)
    assert after.status == "disabled" and "not sent" in (after.disabled_reason or "")


async def test_redirects_are_not_followed(store: JobStore, receiver: WebhookReceiver) -> None:
    elsewhere = WebhookReceiver()
    try:
        receiver.answers = [(307, {"location": elsewhere.url}, b"")]
        sender = WebhookSender(store, LOOPBACK)
        await sender.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))
        await finish(store, "video_1")
        await sender.poll_once()
        assert len(receiver.received) == 1 and elsewhere.received == []
        [event] = await store.due_events(now=time.time() + 3600)
        assert event.deliveries is not None
        [delivery] = event.deliveries.values()
        assert delivery.last_error == "answered 307" and delivery.pending
    finally:
        elsewhere.close()


async def test_a_long_answer_is_not_read_to_its_end(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    receiver.answers = [(200, {}, b"x" * 20_000_000)]
    sender = WebhookSender(store, LOOPBACK)
    await sender.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))
    await finish(store, "video_1")
    started = time.monotonic()
    await deliver_all(sender)
    assert sender.counts["delivered"] == 1
    assert time.monotonic() - started < 5


async def test_a_sender_lost_mid_delivery_is_replaced_without_losing_the_event(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    first = WebhookSender(store, LOOPBACK)
    secret = (await first.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))).secret
    await finish(store, "video_1")
    receiver.hold_next.set()  # the first attempt gets no answer
    dying = asyncio.create_task(first.poll_once())
    assert await asyncio.to_thread(receiver.arrived.wait, 10)
    dying.cancel()  # the sender dies with the event taken up
    with pytest.raises(asyncio.CancelledError):
        await dying
    receiver.release.set()

    second = WebhookSender(store, LOOPBACK)
    assert await second.poll_once() == 0  # still held by the dead sender's claim
    await asyncio.sleep(LOOPBACK.claim_hold_s)
    await deliver_all(second)
    hooks = receiver.received
    assert len(hooks) == 2
    assert hooks[0].headers["webhook-id"] == hooks[1].headers["webhook-id"]
    assert hooks[0].body == hooks[1].body
    assert unwrap(secret or "", hooks[1]).data.id == "video_1"
    assert json.loads(hooks[1].body)["type"] == "video.completed"


async def test_odd_answers_and_names_fail_attempts_not_the_sender(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    """A Retry-After that only looks numeric, and an internationalised host name: failed
    attempts (retried, then given up), never an event stuck in the outbox."""
    from mediagate.webhooks.targets import parse_target

    assert parse_target("https://bücher.example/h").host == "xn--bcher-kva.example"
    receiver.answers = [(503, {"retry-after": "\u00b2"}, b"")] * 5
    settings = LOOPBACK.model_copy(update={"retry_delays_s": (0.05,)})
    sender = WebhookSender(store, settings)
    await sender.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))
    await finish(store, "video_1")
    await deliver_all(sender)
    assert len(receiver.received) == 2 and sender.counts["given_up"] == 1


async def test_an_endpoint_added_after_an_event_does_not_get_it(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    """An event goes to the endpoints the account had when it happened, even when the
    sender takes it up only after a new endpoint was added (a backlog, a sender being
    replaced): the new endpoint's owner never subscribed to the past."""
    sender = WebhookSender(store, LOOPBACK)
    await finish(store, "video_before", clock=lambda: time.time() - CLOCK_SKEW_S - 1)
    await sender.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))
    await finish(store, "video_after")
    await deliver_all(sender)
    assert [json.loads(hook.body)["data"]["id"] for hook in receiver.received] == ["video_after"]


async def test_switched_off_drops_events_instead_of_keeping_a_backlog(
    store: JobStore, receiver: WebhookReceiver
) -> None:
    settings = LOOPBACK.model_copy(update={"enabled": False})
    sender = WebhookSender(store, settings)
    await sender.endpoints.add(ACCOUNT, WebhookEndpointCreate(url=receiver.url))
    await finish(store, "video_1")
    await deliver_all(sender)
    assert receiver.received == [] and sender.counts["dropped"] == 1
