"""Streamed images through the real HTTP path (Serve's ingress, router, scheduler and a
worker replica of the tiny Stable Diffusion model) with the official openai client:
previews decoded mid-way, then the very image an unstreamed request makes; and a client
that hangs up is charged only for work that had started (the hang-up reaches the
scheduler through Serve's ingress)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from mediagate.access.accounts import Account, SqliteAccountStore
from mediagate.access.ledger import LEDGER_DOCUMENT, QuotaLedger
from mediagate.access.quota import LedgerState
from mediagate.access.tiers import load_tier_policy
from mediagate.stores.sqlite_store import SqliteStateStore
from tests.integration.conftest import RunningService


@pytest.fixture
def client(service: RunningService) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=service.key, max_retries=0)


def decoded(b64: str | None) -> np.ndarray:
    assert b64 is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_a_streamed_image_shows_previews_then_the_unstreamed_image(
    client: openai.OpenAI,
) -> None:
    prompt, steps = "a lighthouse at dusk", {"seed": 11, "num_inference_steps": 6}
    started = time.perf_counter()
    arrivals: list[tuple[str, float]] = []
    events = []
    stream = client.images.generate(
        prompt=prompt, size="64x64", n=2, stream=True, partial_images=2, extra_body=steps
    )
    for event in stream:
        arrivals.append((event.type, time.perf_counter() - started))
        events.append(event.model_dump())
    assert [kind for kind, _ in arrivals] == ["image_generation.partial_image"] * 4 + [
        "image_generation.completed"
    ] * 2
    assert [(e["image_index"], e["partial_image_index"]) for e in events[:4]] == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
    ]
    plain = client.images.generate(prompt=prompt, size="64x64", n=2, extra_body=steps)
    assert plain.data is not None
    for completed, unstreamed in zip(events[4:], plain.data, strict=True):
        assert (decoded(completed["b64_json"]) == decoded(unstreamed.b64_json)).all()
    assert all(decoded(e["b64_json"]).shape == (64, 64, 3) for e in events[:4])


def test_a_streamed_inpaint_keeps_what_is_outside_its_mask(client: openai.OpenAI) -> None:
    photo = Image.new("RGB", (64, 64), (20, 160, 220))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    files = []
    for image in (photo, mask):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    events = list(
        client.images.edit(
            image=("photo.png", files[0], "image/png"),
            mask=("mask.png", files[1], "image/png"),
            prompt="a red balloon",
            stream=True,
            partial_images=1,
            extra_body={"num_inference_steps": 4},
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    for event in events:
        pixels = decoded(event.model_dump()["b64_json"])
        assert (pixels[:8, :8] == (20, 160, 220)).all()


def leaver(service: RunningService, name: str) -> tuple[QuotaLedger, Account, dict[str, str]]:
    accounts = SqliteAccountStore(service.home / "state.db")
    account = accounts.ensure_account(name, "pro")
    headers = {"Authorization": f"Bearer {accounts.create_key(account.id)}"}
    return (
        QuotaLedger(SqliteStateStore(service.home / "state.db"), load_tier_policy()),
        account,
        headers,
    )


def images_today(ledger: QuotaLedger, account: Account) -> int:
    """Images charged or still reserved (a held reservation counts until it is settled)."""
    return asyncio.run(ledger.usage(account)).images_today


def held_reservations(ledger: QuotaLedger, account: Account) -> int:
    def read(text: str | None) -> tuple[str | None, int]:
        return text, len(LedgerState.model_validate_json(text).reservations) if text else 0

    return asyncio.run(ledger.store.mutate(account.id, LEDGER_DOCUMENT, read))


def wait_settled(ledger: QuotaLedger, account: Account) -> None:
    deadline = time.monotonic() + 30
    while held_reservations(ledger, account):
        assert time.monotonic() < deadline, "the stream's reservation was never settled"
        time.sleep(0.2)


def stream_until(
    service: RunningService, headers: dict[str, str], body: dict[str, Any], line_start: str
) -> None:
    """Open a streamed request, read until a line starting with ``line_start``, hang up."""
    with (
        httpx.Client(base_url=service.base_url, timeout=60) as http,
        http.stream("POST", "/v1/images/generations", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith(line_start):
                return
    raise AssertionError(f"the stream ended without a line starting {line_start!r}")


def test_a_client_that_leaves_while_queued_is_not_charged(service: RunningService) -> None:
    ledger, account, headers = leaver(service, "stream-leaver-queued")
    busy = {"prompt": "a long one", "size": "64x64", "n": 4, "num_inference_steps": 50}
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(
            httpx.post,
            f"{service.base_url}/v1/images/generations",
            json=busy,
            headers={"Authorization": f"Bearer {service.other_key}"},
            timeout=120,
        )
        time.sleep(1.0)  # the blocker holds the one worker slot
        body = {"prompt": "never mind", "size": "64x64", "stream": True, "partial_images": 1}
        stream_until(service, headers, body, ": queued")
        assert blocker.result().status_code == 200
    wait_settled(ledger, account)
    time.sleep(2.0)  # had the hang-up been missed, the queued stream would run now
    assert images_today(ledger, account) == 0


def test_a_client_that_leaves_mid_stream_pays_for_the_work_it_started(
    service: RunningService,
) -> None:
    ledger, account, headers = leaver(service, "stream-leaver-started")
    body = {
        "prompt": "a slow one",
        "size": "64x64",
        "stream": True,
        "partial_images": 3,
        "num_inference_steps": 40,
    }
    stream_until(service, headers, body, "event: image_generation.partial_image")
    wait_settled(ledger, account)
    assert images_today(ledger, account) == 1  # committed: its work had started
    # The model serves the next request (the abandoned batch ended or was stopped).
    after = httpx.post(
        f"{service.base_url}/v1/images/generations",
        json={"prompt": "next", "size": "64x64", "num_inference_steps": 2},
        headers=headers,
        timeout=60,
    )
    assert after.status_code == 200
    assert images_today(ledger, account) == 2


def router_threads(app_name: str) -> int:
    """Threads of the app's router replica (from /proc: it runs on this machine)."""
    import os

    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if f"{app_name}#Router#" in actor["name"]:
            handle: Any = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
            return len(os.listdir(f"/proc/{pid}/task"))
    raise AssertionError("no router replica")


def test_open_streams_hold_no_router_thread_each(service: RunningService) -> None:
    _, _, headers = leaver(service, "many-streams")
    busy = {"prompt": "a long one", "size": "64x64", "n": 4, "num_inference_steps": 50}
    streams = 24
    opened = threading.Barrier(streams + 1, timeout=60)
    release = threading.Event()

    def hold_stream() -> None:
        body = {"prompt": "wait", "size": "64x64", "stream": True, "partial_images": 1}
        with (
            httpx.Client(base_url=service.base_url, timeout=60) as http,
            http.stream("POST", "/v1/images/generations", json=body, headers=headers) as answer,
        ):
            assert answer.status_code == 200
            next(answer.iter_lines())  # ": queued"
            opened.wait()
            release.wait(60)

    before = router_threads(service.app_name)
    with ThreadPoolExecutor(streams + 1) as pool:
        blocker = pool.submit(
            httpx.post,
            f"{service.base_url}/v1/images/generations",
            json=busy,
            headers={"Authorization": f"Bearer {service.other_key}"},
            timeout=120,
        )
        time.sleep(1.0)
        holders = [pool.submit(hold_stream) for _ in range(streams)]
        opened.wait()  # every stream is open and waiting in the queue
        during = router_threads(service.app_name)
        release.set()
        for holder in holders:
            holder.result()
        assert blocker.result().status_code == 200
    print(f"router threads: {before} before, {during} with {streams} streams open")
    assert during - before < streams // 2
