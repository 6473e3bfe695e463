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


@pytest.mark.parametrize("scheduler", ["flow-match-euler", "unipc-multistep"])
def test_a_job_resumed_from_a_checkpoint_gives_the_frames_of_an_unbroken_run(
    pipeline: Any, scheduler: str
) -> None:
    """Bit for bit: what a lost worker's successor makes from the last checkpoint is
    what the lost one would have made. UniPC (Wan's own default) keeps a history of
    model outputs across steps; the checkpoint carries it."""
    import copy

    from diffusers import UniPCMultistepScheduler

    from models.stepping.checkpoints import checkpoint_bytes, checkpoint_step, resume

    used = copy.copy(pipeline)
    if scheduler == "unipc-multistep":
        used.scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
        )
    stepper = WanStepper(used)
    video = generation(num_inference_steps=6)
    unbroken = alone(stepper, video)
    lost = stepper.start(video)
    for _ in range(4):
        stepper.step([lost])
    data = checkpoint_bytes(lost)
    assert checkpoint_step(data) == 4
    lost.latents.zero_()  # the lost worker's memory is gone; the bytes are what is left
    resumed = resume(stepper.start(video), data)
    assert resumed.step_index == 4
    while not resumed.done:
        stepper.step([resumed])
    assert np.array_equal(np.asarray(stepper.finish(resumed)), unbroken)


def test_a_checkpoint_is_data_and_one_that_does_not_fit_is_refused(pipeline: Any) -> None:
    import io
    import pickle

    from models.stepping.checkpoints import checkpoint_bytes, resume

    stepper = WanStepper(pipeline)
    state = stepper.start(generation())
    stepper.step([state])
    other_size = stepper.start(generation(width=32, height=32))
    with pytest.raises(ValueError, match="do not fit"):
        resume(other_size, checkpoint_bytes(state))

    class Payload:
        def __reduce__(self) -> Any:
            return (print, ("this ran",))

    with pytest.raises(ValueError, match="unreadable"):  # not executed: weights_only
        resume(stepper.start(generation()), pickle.dumps({"format": 1, "x": Payload()}))
    with pytest.raises(ValueError, match="unreadable"):
        resume(stepper.start(generation()), io.BytesIO(b"truncated").getvalue())
