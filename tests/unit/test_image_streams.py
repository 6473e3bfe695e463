"""Streamed answers (``stream: true``) through the official ``openai`` client against the
router app (real stores, a fake scheduler): the events' shapes and order, refusals that
keep their HTTP status, failures after the stream began, and the quota however the
stream ends."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from deployments.router.image_streams import start_image_stream
from mediagate.protocol.errors import GenerationFailed, Overloaded
from mediagate.protocol.images import ImageGenerationRequest
from mediagate.protocol.work import ImageJob, ImageResult, PartialImage, StreamQueued
from tests.fakes import solid_raw
from tests.unit.harness import Service
from tests.unit.test_image_edits import images_today, png
from tests.unit.test_openai_schemas import check


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(tmp_path)


@pytest.fixture
def client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=service.key,
        http_client=service.client,
        max_retries=0,
    )


def red(b64: str) -> int:
    """The red channel of a solid image (the fake scheduler shades by seed)."""
    image = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
    return int(np.asarray(image)[0, 0, 0])


def test_partial_images_then_one_completed_event_per_image(
    service: Service, client: openai.OpenAI
) -> None:
    events = list(
        client.images.generate(
            prompt="a lighthouse",
            size="64x64",
            n=2,
            stream=True,
            partial_images=2,
            extra_body={"seed": 7},
        )
    )
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    partials = [event.model_dump() for event in events[:4]]
    assert [(p["image_index"], p["partial_image_index"]) for p in partials] == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
    ]
    assert [red(p["b64_json"]) for p in partials] == [107, 108, 207 % 256, 208 % 256]
    completed = [event.model_dump() for event in events[4:]]
    assert [red(c["b64_json"]) for c in completed] == [7, 8]  # the images, in order
    assert [c["image_index"] for c in completed] == [0, 1]
    assert completed[0]["size"] == "64x64" and completed[0]["output_format"] == "png"
    [job] = service.scheduler.jobs
    assert job.partial_images == 2
    assert images_today(service) == 2  # charged for the images, not for the previews


def test_events_match_openais_schemas(service: Service) -> None:
    response = service.generate(
        {"prompt": "x", "stream": True, "partial_images": 1, "output_format": "webp"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert any(name.startswith("x-ratelimit-") for name in response.headers)
    blocks = [block for block in response.text.split("\n\n") if block.startswith("event:")]
    names = ["ImageGenPartialImageEvent", "ImageGenCompletedEvent"]
    assert len(blocks) == 2
    for block, name in zip(blocks, names, strict=True):
        event_line, data_line = block.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {data['type']}"
        schema_answer = {k: v for k, v in data.items() if k != "image_index"}  # ours
        schema_answer["size"] = "1024x1024"  # open sizes (see test_openai_schemas)
        check(name, schema_answer)


def test_a_streamed_edit_sends_image_edit_events(service: Service, client: openai.OpenAI) -> None:
    events = list(
        client.images.edit(
            image=("photo.png", png(64, 64), "image/png"),
            prompt="as a watercolour",
            stream=True,
            partial_images=1,
        )
    )
    assert [event.type for event in events] == [
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    [job] = service.scheduler.jobs
    assert job.task == "image-to-image" and job.init_image is not None


def test_without_partial_images_only_the_images_are_sent(
    service: Service, client: openai.OpenAI
) -> None:
    events = list(client.images.generate(prompt="x", size="64x64", stream=True))
    assert [event.type for event in events] == ["image_generation.completed"]
    assert service.scheduler.jobs[0].partial_images == 0


def test_refusals_before_the_stream_keep_their_status(tmp_path: Path) -> None:
    service = Service(tmp_path, tier="free")  # 3 images a day
    client = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=service.key,
        http_client=service.client,
        max_retries=0,
    )
    for _ in range(3):
        list(client.images.generate(prompt="x", stream=True))
    with pytest.raises(openai.RateLimitError) as refused:
        list(client.images.generate(prompt="x", stream=True))
    assert refused.value.response.headers["retry-after"]
    assert refused.value.response.status_code == 429
    assert images_today(service) == 3


def test_a_scheduler_refusal_is_a_503_not_a_stream(service: Service) -> None:
    service.scheduler.fail_with = Overloaded("the queue is full", retry_after_s=4)
    response = service.generate({"prompt": "x", "stream": True})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "4"
    assert response.json()["error"]["message"] == "the queue is full"
    assert images_today(service) == 0


def test_a_failure_after_the_stream_began_is_an_error_event_and_not_charged(
    service: Service, client: openai.OpenAI
) -> None:
    async def fails_midway(job: ImageJob) -> AsyncIterator[Any]:
        yield StreamQueued(estimated_wait_s=1.0)
        yield PartialImage(
            job_index=0, image_index=0, partial_image_index=0, image=solid_raw(64, 64, 1)
        )
        raise GenerationFailed("model tiny-sd failed to generate; please retry")

    service.scheduler.submit_streaming = fails_midway  # type: ignore[method-assign]
    stream = client.images.generate(prompt="x", size="64x64", stream=True, partial_images=1)
    seen = []
    with pytest.raises(openai.APIError, match="failed to generate"):
        for event in stream:
            seen.append(event.type)
    assert seen == ["image_generation.partial_image"]
    # the reservation is settled by the stream's own bookkeeping, detached from the
    # request: the client may see the error event a moment before the release lands
    deadline = time.monotonic() + 5
    while images_today(service) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert images_today(service) == 0


def test_streams_cannot_be_replayed_by_idempotency_key(service: Service) -> None:
    response = service.client.post(
        "/v1/images/generations",
        json={"prompt": "x", "stream": True},
        headers={**service.auth, "Idempotency-Key": "k1"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"
    assert service.scheduler.jobs == [] and images_today(service) == 0


@pytest.mark.parametrize(("started", "images_charged"), [(False, 0), (True, 1)])
async def test_a_caller_who_leaves_mid_stream_pays_only_if_its_work_started(
    tmp_path: Path, started: bool, images_charged: int
) -> None:
    service = Service(tmp_path, tier="free")
    service.scheduler.started_when_withdrawn = started
    stopped = asyncio.Event()

    async def never_finishes(job: ImageJob) -> AsyncIterator[Any]:
        service.scheduler.jobs.append(job)
        try:
            yield StreamQueued(estimated_wait_s=None)
            await asyncio.Event().wait()
            yield ImageResult(request_id=job.request_id, images=[], batch_images=1, inference_s=0)
        finally:
            stopped.set()

    service.scheduler.submit_streaming = never_finishes  # type: ignore[method-assign]
    account = service.accounts.get_account("alice")
    assert account is not None
    body = ImageGenerationRequest(prompt="a cat", stream=True)
    work = service.gateway.images.generation(
        account, body, request_id="req-1", base_url="http://127.0.0.1"
    )
    events, _ = await start_image_stream(service.gateway.images, account, work)
    assert (await events.__anext__()).startswith(b": queued")
    reading = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0.01)
    reading.cancel()  # the client went away while it waited for the next event
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await asyncio.wait_for(stopped.wait(), 5)  # the scheduler's stream was cancelled
    for _ in range(50):  # settling runs in a task of its own
        if service.scheduler.withdrawn:
            break
        await asyncio.sleep(0.01)
    assert service.scheduler.withdrawn == ["req-1"]
    await settled(service)
    usage = await service.gateway.guard.ledger.usage(account)
    assert usage.images_today == images_charged
    counters = service.gateway.guard.counters
    assert (counters["committed"], counters["released"]) == (images_charged, 1 - images_charged)


async def settled(service: Service, settlements: int = 1) -> None:
    """Until the guard has committed or released ``settlements`` reservations (settling
    runs in a task of its own): a reservation merely held reads as charged."""
    counters = service.gateway.guard.counters
    for _ in range(200):
        if counters["committed"] + counters["released"] >= settlements:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never settled: {dict(counters)}")


async def test_a_stream_closed_before_its_first_byte_still_settles(tmp_path: Path) -> None:
    """The client left between admission and the response's start: the events are
    closed without ever being iterated, and the reservation is released all the same."""
    service = Service(tmp_path, tier="free")
    account = service.accounts.get_account("alice")
    assert account is not None
    work = service.gateway.images.generation(
        account, ImageGenerationRequest(prompt="x", stream=True), request_id="r", base_url="/"
    )
    events, _ = await start_image_stream(service.gateway.images, account, work)
    await events.aclose()
    await settled(service)
    assert service.gateway.guard.counters["released"] == 1
    assert service.scheduler.withdrawn == ["r"]  # asked: had it started?
    usage = await service.gateway.guard.ledger.usage(account)
    assert usage.images_today == 0
