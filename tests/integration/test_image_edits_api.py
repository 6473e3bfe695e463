"""Edits through the real HTTP path with the official openai client: the tiny Stable
Diffusion model's image-to-image and inpaint pipelines on a Serve worker replica."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from tests.integration.conftest import RunningService


@pytest.fixture
def client(service: RunningService) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=service.key, max_retries=0)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo(width: int = 96, height: int = 64) -> Image.Image:
    pixels = (np.random.RandomState(3).rand(height, width, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def decoded(b64: str | None) -> np.ndarray:
    assert b64 is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_a_photo_restyled_keeps_its_size(client: openai.OpenAI) -> None:
    result = client.images.edit(
        image=("photo.png", png_bytes(photo()), "image/png"),
        prompt="as an oil painting",
        n=2,
        extra_body={"strength": 0.5, "seed": 11},
    )
    assert result.data is not None and len(result.data) == 2
    assert result.size == "96x64"
    first, second = (decoded(item.b64_json) for item in result.data)
    assert first.shape == (64, 96, 3) and not np.array_equal(first, second)  # seeds 11, 12


def test_with_a_mask_only_the_clear_part_changes(client: openai.OpenAI) -> None:
    source = photo(64, 64)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # the left half is to be redrawn
    result = client.images.edit(
        image=("photo.png", png_bytes(source), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a door on the left",
    )
    assert result.data is not None
    edited = decoded(result.data[0].b64_json).astype(int)
    original = np.asarray(source).astype(int)
    assert np.abs(edited[:, 32:] - original[:, 32:]).max() == 0  # kept exactly
    assert np.abs(edited[:, :32] - original[:, :32]).mean() > 10  # redrawn


def test_an_edit_is_refused_before_anything_runs(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(
            image=("photo.png", png_bytes(photo(64, 64)), "image/png"),
            mask=("mask.png", png_bytes(Image.new("RGBA", (32, 32))), "image/png"),
            prompt="x",
        )
    assert refused.value.body["param"] == "mask"  # type: ignore[index]
