"""The real HTTP path with the official openai client: proxy -> router -> scheduler -> worker."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import hmac
import io
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.conftest import RunningService


@pytest.fixture
def client(service: RunningService) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=service.key, max_retries=0)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_generate_n_images_inline(client: openai.OpenAI) -> None:
    result = client.images.generate(model="tiny-sd", prompt="a red bicycle", n=3, size="64x48")
    assert result.data is not None and len(result.data) == 3
    for item in result.data:
        assert item.b64_json is not None
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (64, 48)
    assert result.size == "64x48" and result.output_format == "png"


def test_generate_jpeg_and_webp(client: openai.OpenAI) -> None:
    for output_format in ("jpeg", "webp"):
        result = client.images.generate(
            prompt="x", output_format=output_format, output_compression=70, size="32x32"
        )
        assert result.data is not None and result.data[0].b64_json is not None
        assert decode(result.data[0].b64_json).format == output_format.upper()


def test_seed_makes_results_reproducible(client: openai.OpenAI) -> None:
    def image(seed: int) -> bytes:
        """The pixels (the files differ: each carries its own signed manifest, dated)."""
        result = client.images.generate(prompt="a cat", size="32x32", extra_body={"seed": seed})
        assert result.data is not None and result.data[0].b64_json is not None
        return bytes(decode(result.data[0].b64_json).convert("RGB").tobytes())

    first, again, other = image(1234), image(1234), image(99)
    assert first == again
    assert first != other


def test_url_download_and_refusals(client: openai.OpenAI, service: RunningService) -> None:
    result = client.images.generate(prompt="a boat", n=2, size="32x32", response_format="url")
    assert result.data is not None
    urls = [item.url for item in result.data]
    assert all(url and url.startswith(service.base_url) for url in urls)
    for url in urls:
        assert url is not None
        downloaded = httpx.get(url)
        assert downloaded.status_code == 200
        assert Image.open(io.BytesIO(downloaded.content)).size == (32, 32)

    url = urls[0]
    assert url is not None
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    tampered = url.replace(
        f"expires={query['expires'][0]}", f"expires={int(query['expires'][0]) + 9999}"
    )
    refused = httpx.get(tampered)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "invalid_signature"

    # A correctly signed URL whose time is over is refused too.
    secret = bytes.fromhex((service.home / "secrets" / "url_signing_key").read_text())
    artifact_id = parts.path.split("/")[3]
    expired_at = 1_000_000_000
    signature = hmac.new(secret, f"{artifact_id}:{expired_at}".encode(), hashlib.sha256).hexdigest()
    expired = httpx.get(
        f"{service.base_url}{parts.path}?expires={expired_at}&signature={signature}"
    )
    assert expired.status_code == 403 and expired.json()["error"]["code"] == "url_expired"


def test_wrong_key_is_authentication_error(service: RunningService) -> None:
    bad = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="mg-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.images.generate(prompt="x")
    assert caught.value.status_code == 401
    # One id, Serve's (the router adopts it rather than adding its own).
    assert len(caught.value.response.headers.get_list("x-request-id")) == 1


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="x", model="no-such-model")
    assert caught.value.code == "model_not_found"


def test_invalid_field_is_bad_request_naming_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="1000x1000")
    assert caught.value.param == "size"


def test_models_endpoint(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["tiny-sd"]
    assert client.models.retrieve("tiny-sd").owned_by == "mediagate"


def test_concurrent_requests_each_get_their_own_seeds_image(client: openai.OpenAI) -> None:
    import numpy as np

    def one(seed: int) -> str:
        result = client.images.generate(prompt="p", size="32x32", extra_body={"seed": seed})
        assert result.data is not None and result.data[0].b64_json is not None
        return result.data[0].b64_json

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = dict(zip(range(8), pool.map(one, range(8)), strict=True))
    alone = {seed: one(seed) for seed in range(8)}  # one at a time: a batch of its own

    def pixels(b64: str) -> Any:
        return np.asarray(decode(b64).convert("RGB"), dtype=np.int16)

    for seed in range(8):
        # Batched arithmetic rounds a few pixels one level differently from a batch of
        # one, so compare pixels, not bytes: images of two seeds differ by ~40 levels.
        difference = np.abs(pixels(together[seed]) - pixels(alone[seed])).mean()
        assert difference < 1.0, (seed, difference)
