"""``POST /v1/images/edits`` through the official ``openai`` client against the router app
(real stores, a fake scheduler that records the jobs): what reaches the scheduler, and
every upload refused before it costs anything."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from mediagate.access.tiers import load_tier_policy
from tests.unit.harness import Service


def png(width: int, height: int, mode: str = "RGB", color: Any = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def hole_mask(width: int, height: int) -> bytes:
    """Opaque, with a transparent square in the middle: edit there only."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(tmp_path)


@pytest.fixture
def client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=service.key,
        http_client=service.client,
        max_retries=0,
    )


def images_today(service: Service, name: str = "alice") -> int:
    import asyncio

    account = service.accounts.get_account(name)
    assert account is not None
    return asyncio.run(service.gateway.guard.ledger.usage(account)).images_today


def test_an_edit_reaches_the_scheduler_as_image_to_image(
    service: Service, client: openai.OpenAI
) -> None:
    result = client.images.edit(
        image=("photo.png", png(100, 50), "image/png"), prompt="as a watercolour", n=2
    )
    assert result.data is not None and len(result.data) == 2 and result.data[0].b64_json
    [job] = service.scheduler.jobs
    assert (job.task, job.strength, job.num_images_per_prompt) == ("image-to-image", 0.8, 2)
    # size auto: the input's 2:1, scaled into the model's limits on its grid of 8
    assert (job.width, job.height) == (104, 48) and result.size == "104x48"
    assert job.init_image is not None and job.mask_image is None
    assert (job.init_image.mode, job.init_image.width, job.init_image.height) == ("RGB", 104, 48)
    assert images_today(service) == 2  # an edit of n=2 is two images


def test_a_mask_makes_it_inpaint_with_diffusers_mask(
    service: Service, client: openai.OpenAI
) -> None:
    client.images.edit(
        image=("photo.png", png(64, 64), "image/png"),
        mask=("mask.png", hole_mask(64, 64), "image/png"),
        prompt="a window",
        extra_body={"strength": "0.6", "seed": "7", "num_inference_steps": "10"},
    )
    [job] = service.scheduler.jobs
    assert (job.task, job.strength, job.seed, job.num_inference_steps) == ("inpaint", 0.6, 7, 10)
    assert job.mask_image is not None and job.mask_image.mode == "L"
    mask = Image.frombytes("L", (64, 64), job.mask_image.pixels)
    assert mask.getpixel((32, 32)) == 255 and mask.getpixel((2, 2)) == 0  # white = repaint


def test_a_list_of_images_is_sent_as_image_brackets(
    service: Service, client: openai.OpenAI
) -> None:
    """The client sends a list as repeated `image[]` parts; this model edits one."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=[png(64, 64), png(64, 64)], prompt="both")
    assert refused.value.body["param"] == "image"  # type: ignore[index]
    assert "one image at a time" in refused.value.message
    assert service.scheduler.jobs == [] and images_today(service) == 0


@pytest.mark.parametrize(
    ("files", "param", "words"),
    [
        ({"image": ("a.png", b"not an image at all")}, "image", "not a PNG, JPEG or WebP"),
        ({"image[]": [("a.png", png(8, 8))] * 17}, "image", "at most 16"),
        (
            {"image": ("a.png", png(64, 64)), "mask": ("m.png", hole_mask(32, 32))},
            "mask",
            "must be the image's size",
        ),
        (
            {"image": ("a.png", png(64, 64)), "mask": ("m.png", png(64, 64))},
            "mask",
            "alpha channel",
        ),
        ({"mask": ("m.png", hole_mask(64, 64))}, "image", "upload the image"),
    ],
)
def test_bad_uploads_are_400s_naming_the_file_and_cost_nothing(
    service: Service, files: dict[str, Any], param: str, words: str
) -> None:
    parts = [
        (name, item)
        for name, value in files.items()
        for item in (value if isinstance(value, list) else [value])
    ]
    response = service.client.post(
        "/v1/images/edits", files=parts, data={"prompt": "x"}, headers=service.auth
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert service.scheduler.jobs == [] and images_today(service) == 0


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds almost nothing."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))


def lossless_webp_bomb() -> bytes:
    """4096x4096 of one colour as lossless WebP: a few hundred bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096), (1, 2, 3)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


@pytest.mark.parametrize("upload", ["header_20000", "webp_bomb"])
def test_huge_images_are_refused_by_their_header(service: Service, upload: str) -> None:
    """Refused unread (the router's time for it is scripts/bench_edits.py's figure)."""
    data = huge_png_header(20000, 20000) if upload == "header_20000" else lossless_webp_bomb()
    assert len(data) < 2000
    response = service.client.post(
        "/v1/images/edits",
        files=[("image", ("big.png", data))],
        data={"prompt": "x"},
        headers=service.auth,
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    assert "pixels" in response.json()["error"]["message"]
    assert service.scheduler.jobs == [] and images_today(service) == 0


def test_a_damaged_image_is_refused_after_admission_and_not_charged(service: Service) -> None:
    """Its header is fine; its pixel data is cut short: found when decoded (after the
    quota was reserved), a 400, and the reservation given back."""
    data = png(64, 64, color=None)
    damaged = data[: len(data) - 30]
    response = service.client.post(
        "/v1/images/edits",
        files=[("image", ("cut.png", damaged))],
        data={"prompt": "x"},
        headers=service.auth,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "image"
    assert service.scheduler.jobs == [] and images_today(service) == 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": "eleven"}, "n"),
        ({"strength": "0"}, "strength"),
        ({"strength": "0.1", "num_inference_steps": "4"}, "strength"),  # int(0.4) = 0 steps
        ({"moderation": "low"}, "moderation"),  # generations only
        ({"stream": "maybe"}, "stream"),
        ({"partial_images": "2"}, "partial_images"),  # without stream
        ({"stream": "true", "response_format": "url"}, "response_format"),
        ({"size": "100x100"}, "size"),
    ],
)
def test_bad_fields_are_400s_naming_them(
    service: Service, fields: dict[str, str], param: str
) -> None:
    response = service.client.post(
        "/v1/images/edits",
        files=[("image", ("a.png", png(64, 64)))],
        data={"prompt": "x", **fields},
        headers=service.auth,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
    assert service.scheduler.jobs == [] and images_today(service) == 0


def test_edits_and_generations_share_the_free_quota(tmp_path: Path) -> None:
    service = Service(tmp_path, tier="free")
    statuses = []
    for index in range(5):
        if index % 2:
            response = service.generate({"prompt": "x"})
        else:
            response = service.client.post(
                "/v1/images/edits",
                files=[("image", ("a.png", png(64, 64)))],
                data={"prompt": "x"},
                headers=service.auth,
            )
        statuses.append(response.status_code)
    assert statuses == [200, 200, 200, 429, 429]
    assert images_today(service) == 3


def test_an_idempotent_edit_is_keyed_by_its_bytes_too(service: Service) -> None:
    def edit(color: Any) -> Any:
        return service.client.post(
            "/v1/images/edits",
            files=[("image", ("a.png", png(64, 64, color=color)))],
            data={"prompt": "x"},
            headers={**service.auth, "Idempotency-Key": "edit-1"},
        )

    first, again = edit((1, 2, 3)), edit((1, 2, 3))
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    assert len(service.scheduler.jobs) == 1  # the repeat was answered from the record
    other = edit((9, 9, 9))  # the same key with other bytes is another request
    assert other.status_code == 409 or other.status_code == 422, other.text


async def test_60_concurrent_edits_and_generations_serve_a_free_account_exactly_3(
    tmp_path: Path,
) -> None:
    import asyncio

    import httpx

    service = Service(tmp_path, tier="free")
    photo = png(64, 64)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.client.app), base_url="http://test"
    ) as http:

        async def one(index: int) -> int:
            if index % 2:
                response = await http.post(
                    "/v1/images/generations", json={"prompt": "x"}, headers=service.auth
                )
            else:
                response = await http.post(
                    "/v1/images/edits",
                    files=[("image", ("a.png", photo))],
                    data={"prompt": "x"},
                    headers=service.auth,
                )
            return response.status_code

        statuses = await asyncio.gather(*(one(index) for index in range(60)))
    assert sorted(set(statuses)) == [200, 429], statuses
    assert statuses.count(200) == 3
    account = service.accounts.get_account("alice")
    assert account is not None
    assert (await service.gateway.guard.ledger.usage(account)).images_today == 3
    assert len(service.scheduler.jobs) == 3


def test_the_tier_file_caps_edits_inputs_and_previews(tmp_path: Path) -> None:
    policy = load_tier_policy()
    free = policy.tiers["free"]
    smaller = free.caps.model_copy(update={"max_input_pixels": 128 * 100})
    policy = policy.model_copy(
        update={"tiers": {**policy.tiers, "free": free.model_copy(update={"caps": smaller})}}
    )
    service = Service(tmp_path, tier="free", policy=policy)  # and 1 preview per image
    big = png(128, 128)  # within the model's and the router's limits, over the tier's
    response = service.client.post(
        "/v1/images/edits",
        files=[("image", ("big.png", big))],
        data={"prompt": "x"},
        headers=service.auth,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "image" and "free tier" in error["message"]
    for endpoint, kwargs in (
        (
            "/v1/images/edits",
            {
                "files": [("image", ("a.png", png(64, 64)))],
                "data": {"prompt": "x", "stream": "true", "partial_images": "2"},
            },
        ),
        ("/v1/images/generations", {"json": {"prompt": "x", "stream": True, "partial_images": 2}}),
    ):
        response = service.client.post(endpoint, headers=service.auth, **kwargs)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "partial_images"
    assert service.scheduler.jobs == [] and images_today(service) == 0
    # Within the caps, the same account streams its one preview.
    ok = service.client.post(
        "/v1/images/generations",
        json={"prompt": "x", "stream": True, "partial_images": 1},
        headers=service.auth,
    )
    assert ok.status_code == 200 and "partial_image" in ok.text
