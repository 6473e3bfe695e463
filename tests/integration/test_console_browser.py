"""The web console in a real headless Chromium (Debian's, driven by playwright; nothing
is downloaded) against a real Serve application with the tiny image and video models:

- a pro key signs in, generates an image and sees it rendered, edits an uploaded photo
  with a mask painted over it, makes a video from an uploaded image and watches its
  progress reach 100%, and finds them in the gallery, where a prompt written as HTML
  shows as text;
- a free key is refused its fourth image of the day and sees the server's message with
  the Retry-After counting down;
- an operator key's operations view plots the queues, decisions and replicas while a
  burst runs, and a limit change the deployment cannot take shows the server's reason;
  a user key is refused there.

Every request the pages make carries the key in the Authorization header only (never in
a URL, a cookie or local storage). ``CONSOLE_SCREENSHOT_DIR=docs/images`` keeps the
screenshots the README shows.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mediagate.access.accounts import open_account_store
from mediagate.stores import StateConfig
from tests.integration.browser import Watched, chromium, plotted

APP = "browser"
XSS_PROMPT = "<img src=x onerror=window.__xss=1>"


@dataclass(frozen=True)
class Console:
    url: str  # the playground; the operations view is url + "ops"
    keys: dict[str, str]  # role -> key
    screenshots: Path


@pytest.fixture(scope="module")
def console(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    from ray import serve

    from deployments.app import AppArgs, build_app

    home = tmp_path_factory.mktemp("console")
    args = AppArgs(
        home=str(home),
        models=["tiny-sd", "tiny-wan"],
        # two more workers on a two-CPU session that already runs others
        worker_ray_actor_options={"num_cpus": 0, "num_gpus": 0},
        router={"poll_after_ms": 200, "public_base_url": f"http://127.0.0.1:{serve_port}/{APP}"},
    )
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    store = open_account_store(StateConfig.embedded(home / "state.db"))
    keys = {
        "pro": store.create_key(store.ensure_account("browser-pro", "pro").id),
        "free": store.create_key(store.ensure_account("browser-free", "free").id),
        "operator": store.create_key(
            store.ensure_account("browser-sre", "pro").id, role="operator"
        ),
    }
    shots = Path(os.environ.get("CONSOLE_SCREENSHOT_DIR") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    yield Console(f"http://127.0.0.1:{serve_port}/{APP}/", keys, shots)
    serve.delete(APP)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_pro_user_makes_an_image_and_a_video_and_finds_them_in_the_gallery(
    console: Console, browser: Any, tmp_path: Path
) -> None:
    user = Watched(browser)
    page = user.page
    user.sign_in(console.url, console.keys["pro"])
    assert "browser-pro · pro" in page.inner_text("#who-name")
    assert "Images today" in page.inner_text("#usage-figures")

    page.fill("#image-form textarea[name=prompt]", XSS_PROMPT)
    page.fill("#image-form input[name=seed]", "7")
    page.click("#image-form button[type=submit]")
    image = page.wait_for_selector("#image-results img")
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=image)
    page.screenshot(path=str(console.screenshots / "playground.png"), full_page=True)

    photo = tmp_path / "photo.png"
    photo.write_bytes(png(64, 64))
    page.click("[data-tab=edit]")
    page.set_input_files("#edit-form input[name=image]", str(photo))
    page.wait_for_function("() => document.querySelector('#edit-canvas').width === 256")  # shown 4x
    box = page.locator("#edit-canvas").bounding_box()
    page.mouse.move(box["x"] + 10, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.fill("#edit-form textarea[name=prompt]", "a red door")
    page.click("#edit-form button[type=submit]")
    edited = page.wait_for_selector("#edit-results img")
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=edited)
    [fields] = page.evaluate("window.__forms")  # the form the page sent
    assert fields[:2] == ["image", "mask"], fields  # the painted mask went along
    page.screenshot(path=str(console.screenshots / "edit.png"), full_page=True)

    page.click("[data-tab=video]")
    page.fill("#video-form textarea[name=prompt]", "waves on a beach")
    page.set_input_files("#video-form input[name=input_reference]", str(photo))
    page.click("#video-form button[type=submit]")
    progress_seen: list[int] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        value = page.evaluate("document.querySelector('#video-jobs progress')?.value ?? -1")
        progress_seen.append(int(value))
        if page.query_selector("#video-jobs video"):
            break
        page.wait_for_timeout(300)
    state = page.inner_text("#video-jobs .job-state")
    assert state.startswith("completed · 100%"), (state, progress_seen)
    assert progress_seen[-1] == 100 and min(progress_seen) < 100, progress_seen
    page.wait_for_function(
        "() => document.querySelector('#video-jobs video').readyState >= 1"
    )  # the browser read the MP4 it was given
    page.screenshot(path=str(console.screenshots / "video.png"), full_page=True)

    page.click("[data-tab=gallery]")
    page.wait_for_selector("#gallery-images figure:nth-of-type(2)")  # the edit, the image
    captions = page.inner_text("#gallery-images")
    assert XSS_PROMPT in captions and "a red door" in captions  # shown as text, not markup
    assert page.query_selector("#gallery-images img[src='x']") is None
    page.wait_for_selector("#gallery-videos .job-media img")  # the video's thumbnail
    assert "waves on a beach" in page.inner_text("#gallery-videos")
    page.screenshot(path=str(console.screenshots / "gallery.png"), full_page=True)
    user.check_key_handling(console.keys["pro"])


def test_a_free_user_sees_the_refusal_and_its_countdown(console: Console, browser: Any) -> None:
    user = Watched(browser)
    page = user.page
    user.sign_in(console.url, console.keys["free"])
    for number in range(4):
        page.fill("#image-form textarea[name=prompt]", f"free image {number}")
        page.click("#image-form button[type=submit]")
        page.wait_for_selector("#image-form button[type=submit]:not([disabled])")
    page.wait_for_selector("#refusal:not([hidden])")
    assert "429 insufficient_quota" in page.inner_text("#refusal-title")
    assert "3 of your 3 images" in page.inner_text("#refusal-message")
    first = page.inner_text("#refusal-countdown")
    assert re.fullmatch(r"\d+ h \d+ min \d+ s", first), first
    page.wait_for_function(
        "before => document.querySelector('#refusal-countdown').textContent !== before",
        arg=first,
    )  # it counts down
    assert "3 of 3, 0 left" in page.inner_text("#usage-figures")
    page.screenshot(path=str(console.screenshots / "refusal.png"), full_page=True)
    user.check_key_handling(console.keys["free"])


def burst(base_url: str, key: str, stop: threading.Event) -> None:
    """Image requests 8 at a time until ``stop``."""

    def one(http: httpx.Client) -> None:
        while not stop.is_set():
            http.post("v1/images/generations", json={"prompt": "burst", "n": 4})

    with httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as http:
        threads = [threading.Thread(target=one, args=(http,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def test_the_operations_view_plots_a_burst_for_operators_only(
    console: Console, browser: Any
) -> None:
    user = Watched(browser)
    user.sign_in(console.url + "ops", console.keys["pro"])
    user.page.wait_for_function(
        "() => document.querySelector('#ops-state').textContent.includes('not an operator')"
    )

    sre = Watched(browser)
    page = sre.page
    sre.sign_in(console.url + "ops", console.keys["operator"])
    page.wait_for_selector("[data-model='tiny-sd'] canvas[data-plot='queue'][data-latest]")
    stop = threading.Event()
    load = threading.Thread(target=burst, args=(console.url, console.keys["pro"], stop))
    load.start()
    admitted: list[float] = []
    queued: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            max(admitted, default=0) > 0 and len(admitted) > 5
        ):
            page.wait_for_timeout(2000)
            admitted.append(plotted(page, "tiny-sd", "decisions").get("admitted", 0.0))
            queued.append(sum(plotted(page, "tiny-sd", "queue").values()))
        page.screenshot(path=str(console.screenshots / "ops.png"), full_page=True)
    finally:
        stop.set()
        load.join()
    assert max(admitted) > 0, admitted  # the plot followed the burst
    replicas = plotted(page, "tiny-sd", "replicas")
    assert replicas["replicas"] >= 1 and replicas["max"] >= replicas["min"] >= 1, replicas
    samples = int(
        page.get_attribute("[data-model='tiny-sd'] canvas[data-plot='queue']", "data-samples") or 0
    )
    assert samples >= 5

    # This app was deployed with serve.run, not from a config: the server says so.
    form = "[data-model='tiny-sd'] form.limits"
    page.fill(f"{form} input[name=max_replicas]", "3")
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector(f"{form} .limits-answer.error")
    assert "not deployed from a config" in page.inner_text(f"{form} .limits-answer")
    sre.check_key_handling(console.keys["operator"])
    print(f"\nadmitted/s per sample: {admitted}; queued: {queued}")
