"""Edits on the real tiny Stable Diffusion pipeline, without Ray: the image-to-image and
inpaint pipelines are built from the loaded one (no second copy of any weight), run
the share of the steps that ``strength`` gives, keep every pixel outside an inpaint
mask, and leave text-to-image exactly as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deployments.workers.text_to_image import TextToImage, generate_batch
from mediagate.protocol.work import ImageJob
from models.catalog import load_catalog
from models.uploads import edit_input, inpaint_mask

SPEC = load_catalog().models["tiny-sd"]
BASE: dict[str, Any] = {
    "request_id": "r",
    "prompt": "a harbour",
    "width": 64,
    "height": 64,
    "num_inference_steps": 10,
    "guidance_scale": 7.5,
    "num_images_per_prompt": 1,
    "seed": 1,
    "output_format": "png",
}


@pytest.fixture(scope="module")
def worker(model_cache: Path) -> TextToImage:
    return TextToImage(SPEC, cache_dir=str(model_cache), torch_threads=1)


def photo() -> Any:
    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))


def run(worker: TextToImage, **fields: Any) -> tuple[np.ndarray, int]:
    """The image made, and the denoising steps that ran (calls of the scheduler's step)."""
    job = ImageJob(**(BASE | fields))
    pipeline = worker.pipelines[job.task]
    scheduler = pipeline.scheduler
    steps = 0
    step = scheduler.step

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        steps += 1
        return step(*args, **kwargs)

    scheduler.step = counted
    try:
        [result] = generate_batch(pipeline, [job])
    finally:
        del scheduler.step  # the class's method again
    raw = result.images[0]
    return np.frombuffer(raw.pixels, np.uint8).reshape(raw.height, raw.width, -1), steps


def test_the_edit_pipelines_share_every_weight(worker: TextToImage) -> None:
    assert set(worker.pipelines) == {"text-to-image", "image-to-image", "inpaint"}
    base = worker.pipeline
    for task in ("image-to-image", "inpaint"):
        pipeline = worker.pipelines[task]
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert getattr(pipeline, name) is getattr(base, name), (task, name)


@pytest.mark.parametrize(("strength", "steps_run"), [(0.3, 3), (0.8, 8), (1.0, 10)])
def test_strength_runs_its_share_of_the_steps(
    worker: TextToImage, strength: float, steps_run: int
) -> None:
    image, steps = run(
        worker, task="image-to-image", strength=strength, init_image=edit_input(photo(), 64, 64)
    )
    assert steps == steps_run and image.shape == (64, 64, 3)


def test_inpaint_keeps_every_pixel_outside_the_mask(worker: TextToImage) -> None:
    source = photo()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: edit here only
    image, _ = run(
        worker,
        task="inpaint",
        strength=1.0,
        init_image=edit_input(source, 64, 64),
        mask_image=inpaint_mask(mask, 64, 64),
    )
    original = np.asarray(source)
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert np.abs(image.astype(int) - original)[outside].max() == 0
    assert np.abs(image.astype(int) - original)[~outside].mean() > 10  # redrawn inside


def test_text_to_image_is_unchanged_by_edits_on_the_shared_scheduler(
    worker: TextToImage,
) -> None:
    before, _ = run(worker)
    run(worker, task="image-to-image", strength=0.3, init_image=edit_input(photo(), 64, 64))
    after, _ = run(worker)
    assert np.array_equal(before, after)
