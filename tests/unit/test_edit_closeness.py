"""How close an image-to-image edit stays to its photo, measured on the tiny Stable
Diffusion pipeline with a VAE that reconstructs (tests/unit/reconstructing_vae.py) and a
UNet that predicts no noise: what comes back is then the photo plus exactly the noise
diffusers adds for the edit's ``strength`` (sigma at the first step that runs), through
mediagate's own path (upload decode, the worker's pipeline call, raw pixels). A random
model cannot denoise, so this bounds mediagate's path, not a real model's fidelity."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deployments.router.edit_uploads import EditUploads, decode_edit_inputs
from deployments.workers.text_to_image import generate_batch
from mediagate.protocol.work import ImageJob
from models.catalog import load_catalog
from models.loading import load_pipeline
from models.uploads import UploadLimits
from tests.unit.reconstructing_vae import reconstructing_vae, without_noise_prediction

STEPS = 20


@pytest.fixture(scope="module")
def image_to_image(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diffusers import AutoPipelineForImage2Image

    text_to_image = load_pipeline(
        load_catalog().models["tiny-sd"], cache_dir=tmp_path_factory.mktemp("models")
    )
    without_noise_prediction(text_to_image.unet)
    vae = reconstructing_vae(text_to_image.vae.config.scaling_factor)
    return AutoPipelineForImage2Image.from_pipe(text_to_image, vae=vae)


def photo_png() -> tuple[bytes, np.ndarray]:
    ramp = np.linspace(0, 1, 64)
    pixels = np.stack(
        [np.outer(ramp, 1 - ramp) * 500, np.outer(1 - ramp, ramp) * 500, np.full((64, 64), 120)],
        axis=-1,
    )
    image = Image.fromarray(pixels.clip(0, 255).astype("uint8"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), np.asarray(image).astype(float)


def first_sigma(pipeline: Any, strength: float) -> float:
    """The noise level diffusers starts an edit of ``strength`` at (its ``get_timesteps``)."""
    pipeline.scheduler.set_timesteps(STEPS)
    t_start = STEPS - min(int(STEPS * strength), STEPS)
    return float(pipeline.scheduler.sigmas[t_start])


def expected_difference(original: np.ndarray, sigma: float) -> float:
    """E|clip(photo + 127.5 sigma n) - photo| over the photo's pixels, n ~ N(0, 1): the
    noise diffusers adds at ``sigma``, in pixel units, less what clipping at 0 and 255
    hides (by sampling, 64 draws a pixel)."""
    draws = np.random.default_rng(0).standard_normal((64, *original.shape))
    noisy = np.clip(original + 127.5 * sigma * draws, 0, 255)
    return float(np.abs(noisy - original).mean())


@pytest.mark.parametrize("strength", [0.05, 0.1, 0.25, 0.5])
def test_a_low_strength_edit_comes_back_as_its_photo_plus_the_noise_of_its_strength(
    image_to_image: Any, strength: float
) -> None:
    upload, original = photo_png()
    limits = UploadLimits(max_bytes=10**6, max_pixels=10**6)
    init_image, _ = decode_edit_inputs(EditUploads([upload], None), 64, 64, limits)  # router's
    job = ImageJob(
        request_id="r",
        prompt="a harbour",
        width=64,
        height=64,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        num_images_per_prompt=1,
        seed=1,
        output_format="png",
        task="image-to-image",
        strength=strength,
        init_image=init_image,
    )
    [result] = generate_batch(image_to_image, [job])
    edited = np.frombuffer(result.images[0].pixels, np.uint8).reshape(64, 64, 3).astype(float)
    difference = np.abs(edited - original).mean()
    expected = expected_difference(original, first_sigma(image_to_image, strength))
    print(f"strength {strength}: mean |edited - photo| {difference:.2f}, noise {expected:.2f}")
    assert expected * 0.85 - 0.5 <= difference <= expected * 1.15 + 0.5  # (+-0.5: uint8)
    if strength <= 0.05:
        assert difference < 6.0  # of 255: a 0.05 edit of 20 steps is its photo, nearly


def test_the_reconstructing_vae_reconstructs(image_to_image: Any) -> None:
    import torch

    _, original = photo_png()
    pixels = torch.tensor(original).permute(2, 0, 1)[None].float() / 127.5 - 1
    vae = image_to_image.vae
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
        back = vae.decode(latents).sample
    assert float((back - pixels).abs().max()) < 1e-4
