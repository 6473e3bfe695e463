"""The Stable Diffusion loop run step by step (models/stepping/stable_diffusion.py) on the
real tiny pipeline: a request alone gives the stock pipeline call's image for the same
seed; a request that joins a running batch mid-way, at another step count and guidance,
gives what it gives alone; a multistep scheduler works because each request has its own
copy. Tolerance: 1/255 (float rounding of different batch compositions)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from deployments.workers.text_to_image import generate_batch
from mediagate.protocol.work import ImageJob
from models.catalog import load_catalog
from models.loading import load_pipeline
from models.stepping.stable_diffusion import StableDiffusionStepper, StepState

TOLERANCE = 1  # of 255, per pixel


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch

    torch.set_num_threads(1)
    return load_pipeline(load_catalog().models["tiny-sd"], cache_dir=tmp_path_factory.mktemp("m"))


def job(name: str, **fields: Any) -> ImageJob:
    values: dict[str, Any] = {
        "request_id": name,
        "prompt": f"a lighthouse {name}",
        "width": 64,
        "height": 64,
        "num_inference_steps": 6,
        "guidance_scale": 7.5,
        "num_images_per_prompt": 1,
        "seed": 11,
        "output_format": "png",
    }
    return ImageJob(**(values | fields))


def arrays(images: list[Any]) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")).astype(int) for image in images]


def stock(pipeline: Any, request: ImageJob) -> list[np.ndarray]:
    """The whole-pipeline worker's image (one diffusers call)."""
    [result] = generate_batch(pipeline, [request])
    return [
        np.frombuffer(raw.pixels, np.uint8).reshape(raw.height, raw.width, 3).astype(int)
        for raw in result.images
    ]


def alone(stepper: StableDiffusionStepper, request: ImageJob) -> list[np.ndarray]:
    state = stepper.start(request)
    while not state.done:
        stepper.step([state])
    return arrays(stepper.finish(state))


def assert_close(made: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(made) == len(expected)
    for a, b in zip(made, expected, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= TOLERANCE, np.abs(a - b).max()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"num_images_per_prompt": 2, "num_inference_steps": 4},
        {"negative_prompt": "fog", "guidance_scale": 4.0, "width": 48},
        {"guidance_scale": 1.0},  # no classifier-free guidance
    ],
)
def test_a_request_alone_gives_the_stock_pipeline_image(pipeline: Any, fields: Any) -> None:
    request = job("a", **fields)
    assert_close(alone(StableDiffusionStepper(pipeline), request), stock(pipeline, request))


def test_a_request_joining_mid_way_gives_what_it_gives_alone(pipeline: Any) -> None:
    stepper = StableDiffusionStepper(pipeline)
    first = job("first", num_inference_steps=6, seed=1)
    joiner = job(
        "joiner", num_inference_steps=4, seed=9, guidance_scale=5.0, num_images_per_prompt=2
    )
    running = [stepper.start(first)]
    for _ in range(2):
        stepper.step(running)
    running.append(stepper.start(joiner))  # joins at the first's step 2
    finished: dict[str, StepState] = {}
    while running:
        stepper.step(running)
        for state in [s for s in running if s.done]:
            finished[state.job.request_id] = state
            running.remove(state)
    assert finished["first"].step_index == 6 and finished["joiner"].step_index == 4
    assert_close(arrays(stepper.finish(finished["first"])), alone(stepper, first))
    assert_close(arrays(stepper.finish(finished["joiner"])), alone(stepper, joiner))
    assert_close(alone(stepper, joiner), stock(pipeline, joiner))


def test_a_multistep_scheduler_keeps_its_history_per_request(pipeline: Any) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    multistep = StableDiffusionPipeline(
        **{
            **pipeline.components,
            "scheduler": DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config),
        }
    )
    stepper = StableDiffusionStepper(multistep)
    first, joiner = job("first", num_inference_steps=8, seed=2), job("joiner", seed=3)
    running = [stepper.start(first)]
    stepper.step(running)
    running.append(stepper.start(joiner))
    results: dict[str, list[np.ndarray]] = {}
    while running:
        stepper.step(running)
        for state in [s for s in running if s.done]:
            results[state.job.request_id] = arrays(stepper.finish(state))
            running.remove(state)
    assert_close(results["first"], stock(multistep, first))
    assert_close(results["joiner"], stock(multistep, joiner))


def test_only_requests_of_one_shape_and_guidance_share_a_pass(pipeline: Any) -> None:
    stepper = StableDiffusionStepper(pipeline)
    small, large = stepper.start(job("s", width=48)), stepper.start(job("l"))
    unguided = stepper.start(job("u", guidance_scale=1.0))
    for mixed in ([small, large], [large, unguided]):
        with pytest.raises(ValueError, match="share"):
            stepper.step(mixed)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny SDXL pipeline (``tiny://stable-diffusion-xl``: two CLIP encoders, the
    UNet's added text/time conditioning), through the real loading path."""
    tiny_sd = load_catalog().models["tiny-sd"]
    spec = tiny_sd.model_copy(
        update={
            "id": "tiny-sdxl",
            "source": "tiny://stable-diffusion-xl",
            "pipeline_class": "StableDiffusionXLPipeline",
            "tasks": ["text-to-image"],
        }
    )
    return load_pipeline(spec, cache_dir=tmp_path_factory.mktemp("sdxl"))


@pytest.mark.parametrize(
    "fields",
    [{}, {"negative_prompt": "fog", "num_images_per_prompt": 2}, {"guidance_scale": 1.0}],
)
def test_sdxl_alone_and_joining_mid_way_gives_the_stock_pipeline_image(
    sdxl: Any, fields: Any
) -> None:
    from models.stepping.stable_diffusion import StableDiffusionXLStepper

    stepper = StableDiffusionXLStepper(sdxl)
    request = job("x", seed=4, **fields)
    assert_close(alone(stepper, request), stock(sdxl, request))
    first = job("first", num_inference_steps=5, seed=1, guidance_scale=request.guidance_scale)
    running = [stepper.start(first)]
    stepper.step(running)
    running.append(stepper.start(request))  # joins at the first's step 1
    made: dict[str, list[np.ndarray]] = {}
    while running:
        stepper.step(running)
        for state in [s for s in running if s.done]:
            made[state.job.request_id] = arrays(stepper.finish(state))
            running.remove(state)
    assert_close(made["x"], stock(sdxl, request))
    assert_close(made["first"], stock(sdxl, first))
