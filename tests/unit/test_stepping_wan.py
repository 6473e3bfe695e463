"""The Wan loop step by step (models/stepping/wan.py) on the tiny Wan pipeline: a job
alone gives the stock pipeline call's frames for the same seed, and a job that joins a
running one mid-way gives what it gives alone. Tolerance: 1e-4 on frames in [0, 1]."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mediagate.protocol.work import VideoGeneration
from models.catalog import load_catalog
from models.loading import load_pipeline
from models.stepping.wan import WanStepper

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch

    torch.set_num_threads(1)
    return load_pipeline(load_catalog().models["tiny-wan"], cache_dir=tmp_path_factory.mktemp("m"))


def generation(**fields: Any) -> VideoGeneration:
    values: dict[str, Any] = {
        "prompt": "waves on a beach",
        "width": 64,
        "height": 64,
        "num_frames": 9,
        "fps": 8,
        "num_inference_steps": 4,
        "guidance_scale": 5.0,
        "seed": 3,
    }
    return VideoGeneration(**(values | fields))


def stock(pipeline: Any, video: VideoGeneration) -> np.ndarray:
    import torch

    output = pipeline(
        **video.pipeline_kwargs(),
        generator=torch.Generator(device="cpu").manual_seed(video.seed),
        output_type="np",
    )
    return np.asarray(output.frames[0])


def alone(stepper: WanStepper, video: VideoGeneration) -> np.ndarray:
    state = stepper.start(video)
    while not state.done:
        stepper.step([state])
    return np.asarray(stepper.finish(state))


@pytest.mark.parametrize(
    "fields", [{}, {"guidance_scale": 1.0}, {"negative_prompt": "rain", "num_inference_steps": 3}]
)
def test_a_job_alone_gives_the_stock_pipeline_frames(pipeline: Any, fields: Any) -> None:
    video = generation(**fields)
    made, expected = alone(WanStepper(pipeline), video), stock(pipeline, video)
    assert made.shape == expected.shape
    assert np.abs(made - expected).max() <= TOLERANCE


def test_a_job_joining_mid_way_gives_what_it_gives_alone(pipeline: Any) -> None:
    stepper = WanStepper(pipeline)
    first, joiner = generation(num_inference_steps=5), generation(prompt="a storm", seed=8)
    running = [stepper.start(first)]
    stepper.step(running)
    stepper.step(running)
    running.append(stepper.start(joiner))
    frames: dict[str, np.ndarray] = {}
    while running:
        stepper.step(running)
        for state in [s for s in running if s.done]:
            frames[state.generation.prompt] = np.asarray(stepper.finish(state))
            running.remove(state)
    assert np.abs(frames["waves on a beach"] - alone(stepper, first)).max() <= TOLERANCE
    assert np.abs(frames["a storm"] - stock(pipeline, joiner)).max() <= TOLERANCE
