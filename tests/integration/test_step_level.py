"""Step-level serving through the real path (issue 17): an application whose tiny
Stable Diffusion model and simulated model are served step by step
(``stepping`` in the catalog: StepLevelTextToImage workers, seats, no preemption).
The stepped image equals the whole-pipeline worker's for the same seed, and a pro
request that arrives while free work holds the worker pauses it at a step and
finishes first, without the free requests failing or running a step twice."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from mediagate.access.accounts import SqliteAccountStore
from tests.integration.conftest import RunningService, write_unlimited_tiers

APP = "stepped"


@pytest.fixture(scope="module")
def stepped(
    serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str], dict[str, str]]]:
    from ray import serve

    from deployments.app import AppArgs, build_app

    home = tmp_path_factory.mktemp("stepped-home")
    catalog = yaml.safe_load(resources.files("models").joinpath("catalog.yaml").read_text())
    catalog["models"]["tiny-sd"]["stepping"] = {"seats_per_replica": 4}
    catalog["models"]["sim-step"] = {
        "task": "text-to-image",
        "source": "simulated://sim-step?step_ms=25&batch_cost=0.1",
        "defaults": {"size": "64x64", "num_inference_steps": 20, "guidance_scale": 7.5},
        "caps": {"max_width": 256, "max_height": 256, "max_steps": 100, "max_n": 1},
        "batching": {"max_batch_size": 1},  # one image per step: pausing shows
        "stepping": {"seats_per_replica": 4},
    }
    catalog["default_models"]["text-to-image"] = "tiny-sd"
    catalog_path = home / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(catalog))
    args = AppArgs(
        home=str(home),
        catalog=str(catalog_path),
        models=["tiny-sd", "sim-step"],
        tiers_file=str(write_unlimited_tiers(home)),
        worker_ray_actor_options={"num_cpus": 0, "num_gpus": 0},
    )
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    accounts = SqliteAccountStore(home / "state.db")
    pro = accounts.create_key(accounts.ensure_account("stepped-pro", "pro").id)
    free = accounts.create_key(accounts.ensure_account("stepped-free", "free").id)
    yield (
        f"http://127.0.0.1:{serve_port}/{APP}",
        {"Authorization": f"Bearer {pro}"},
        {"Authorization": f"Bearer {free}"},
    )
    serve.delete(APP)


def image_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_a_stepped_image_is_the_whole_pipeline_image(
    stepped: tuple[str, dict[str, str], dict[str, str]], service: RunningService
) -> None:
    base_url, pro, _ = stepped
    body = {
        "model": "tiny-sd",
        "prompt": "a harbour",
        "size": "64x48",
        "seed": 5,
        "num_inference_steps": 6,
    }
    made = image_of(
        httpx.post(f"{base_url}/v1/images/generations", json=body, headers=pro, timeout=60)
    )
    whole = image_of(
        httpx.post(
            f"{service.base_url}/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {service.key}"},
            timeout=60,
        )
    )
    assert np.abs(made - whole).max() <= 1


def test_pro_pauses_free_work_at_a_step_and_finishes_first(
    stepped: tuple[str, dict[str, str], dict[str, str]],
) -> None:
    from ray import serve

    base_url, pro, free = stepped
    finished: dict[str, float] = {}

    def generate(name: str, headers: dict[str, str], steps: int) -> int:
        body = {"model": "sim-step", "prompt": name, "num_inference_steps": steps}
        answer = httpx.post(
            f"{base_url}/v1/images/generations", json=body, headers=headers, timeout=60
        )
        finished[name] = time.monotonic()
        return answer.status_code

    with ThreadPoolExecutor(3) as pool:
        free_run = pool.submit(generate, "free", free, 30)  # 30 steps of 25 ms (free cap)
        time.sleep(0.4)  # free is some steps in
        pro_run = pool.submit(generate, "pro", pro, 8)
        assert pro_run.result() == 200
        assert free_run.result() == 200
    assert finished["pro"] < finished["free"]
    worker = serve.get_deployment_handle("TextToImage-sim-step", app_name=APP)
    stats = worker.engine_stats.remote().result()
    assert stats["pause_steps"] >= 8  # free sat out pro's steps
    assert stats["images_stepped"] == 1 + 30 + 8  # the warm-up, then no step twice
    # GET /v1/status shows the model's step loop and the waits to a first step
    status = httpx.get(f"{base_url}/v1/status", headers=pro, timeout=30).json()
    step_level = status["models"]["sim-step"]["step_level"]
    assert step_level["steps_per_s"] > 0 and step_level["images_per_step"] == 1.0
    assert step_level["seats_held"] == 0 and step_level["paused"] == 0
    assert set(step_level["first_step_wait_s_by_tier"]) == {"pro", "free"}


def test_a_stepped_stream_gets_its_previews_before_its_image(
    stepped: tuple[str, dict[str, str], dict[str, str]],
) -> None:
    import openai

    base_url, pro, _ = stepped
    client = openai.OpenAI(
        base_url=f"{base_url}/v1", api_key=pro["Authorization"].split()[1], max_retries=0
    )
    stream = client.images.generate(
        model="tiny-sd", prompt="a harbour", size="64x64", stream=True, partial_images=2
    )
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    previews = [event for event in events if event.type == "image_generation.partial_image"]
    assert [event.partial_image_index for event in previews] == [0, 1]
    for event in events:  # each a real 64x64 picture: a decode of the latents at a step
        picture = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
        assert picture.size == (64, 64)
