"""The router's HTTP surface against a fake scheduler: validation, auth, errors, URLs."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from starlette.types import Message, Scope

from mediagate.protocol.errors import GenerationFailed
from tests.unit.harness import Service

URL = "/v1/images/generations"
JPEG_MAGIC = b"\xff\xd8\xff"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield Service(tmp_path)


def assert_error(response: Any, status: int, param: str | None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    assert response.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "n": 5}, "n"),  # over the tiny model's cap of 4
        ({"prompt": "x", "size": "big"}, "size"),
        ({"prompt": "x", "size": "60x64"}, "size"),  # not a multiple of 8
        ({"prompt": "x", "size": "512x512"}, "size"),  # over the model's cap
        ({"prompt": "x", "quality": "ultra"}, "quality"),
        ({"prompt": "x", "quality": "high", "num_inference_steps": 3}, "quality"),
        ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "output_format": "png", "output_compression": 50}, "output_compression"),
        ({"prompt": "x", "output_format": "jpeg", "output_compression": 101}, "output_compression"),
        ({"prompt": "x", "background": "transparent"}, "background"),
        ({"prompt": "x", "style": "vivid"}, "style"),
        ({"prompt": "x", "stream": "sometimes"}, "stream"),
        ({"prompt": "x", "partial_images": 2}, "partial_images"),  # without stream
        ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images"),
        ({"prompt": "x", "stream": True, "response_format": "url"}, "response_format"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 51}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": 99}, "guidance_scale"),
        ({"prompt": "x", "user": "u" * 300}, "user"),
        ({"prompt": "x", "colour": "red"}, "colour"),
        ({"prompt": "x", "model": "tiny-sd", "n": "many"}, "n"),
    ],
)
def test_every_bad_field_is_a_400_naming_it(service: Service, body: Any, param: str) -> None:
    assert_error(service.generate(body), 400, param)
    assert service.scheduler.jobs == []


def test_unknown_field_says_so(service: Service) -> None:
    assert_error(
        service.generate({"prompt": "x", "colour": "red"}), 400, "colour", "unknown_parameter"
    )


def test_body_that_is_not_json_or_not_an_object(service: Service) -> None:
    response = service.client.post(URL, content=b"{nope", headers=service.auth)
    assert_error(response, 400, None, "invalid_json")
    assert_error(service.generate([1, 2]), 400, None, "invalid_type")


def test_prompt_longer_than_configured_is_rejected(tmp_path: Path) -> None:
    service = Service(tmp_path, max_prompt_chars=10)
    assert_error(service.generate({"prompt": "x" * 11}), 400, "prompt", "string_above_max_length")


def test_valid_request_becomes_a_resolved_job(service: Service) -> None:
    response = service.generate(
        {"prompt": "a cat", "n": 2, "size": "64x48", "seed": 7, "negative_prompt": "dogs"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "64x48" and body["output_format"] == "png" and len(body["data"]) == 2
    assert base64.b64decode(body["data"][0]["b64_json"]).startswith(b"\x89PNG")
    [job] = service.scheduler.jobs
    assert (job.width, job.height, job.num_images_per_prompt, job.seed) == (64, 48, 2, 7)
    assert job.negative_prompt == "dogs" and job.num_inference_steps == 4
    assert job.request_id == response.headers["x-request-id"]


def test_quality_maps_to_catalog_steps(service: Service) -> None:
    assert service.generate({"prompt": "x", "quality": "high"}).status_code == 200
    assert service.generate({"prompt": "x", "quality": "hd"}).status_code == 200
    assert [job.num_inference_steps for job in service.scheduler.jobs] == [8, 8]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer mg-wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer "},
    ],
)
def test_missing_or_wrong_key_is_401(service: Service, headers: dict[str, str]) -> None:
    response = service.client.post(URL, json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert service.scheduler.jobs == []


def test_auth_comes_before_validation(service: Service) -> None:
    response = service.client.post(URL, json={"n": 99}, headers={"Authorization": "Bearer no"})
    assert response.status_code == 401


def test_revoked_key_is_refused(service: Service) -> None:
    assert service.accounts.revoke(service.key[:11])
    assert service.generate({"prompt": "x"}).status_code == 401


def test_unknown_model_is_404(service: Service) -> None:
    assert_error(
        service.generate({"prompt": "x", "model": "nope"}), 404, "model", "model_not_found"
    )
    response = service.client.get("/v1/models/nope", headers=service.auth)
    assert_error(response, 404, "model", "model_not_found")


def test_models_list_and_get(service: Service) -> None:
    listing = service.client.get("/v1/models", headers=service.auth).json()
    assert listing["object"] == "list"
    assert [model["id"] for model in listing["data"]] == ["tiny-sd", "tiny-wan"]
    model = service.client.get("/v1/models/tiny-sd", headers=service.auth).json()
    assert model["object"] == "model" and model["owned_by"] == "mediagate"
    assert model["tasks"] == ["text-to-image", "image-to-image", "inpaint"]


def test_declared_body_over_limit_is_413_unread(tmp_path: Path) -> None:
    """A raw ASGI call, so the test sees every read of the body: there is none."""
    service = Service(tmp_path, max_body_bytes=2048)
    body = json.dumps({"prompt": "x" * 5000}).encode()
    reads: list[Message] = []
    sent: list[Message] = []

    async def receive() -> Message:
        message: Message = {"type": "http.request", "body": body, "more_body": False}
        reads.append(message)
        return message

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": URL,
        "raw_path": URL.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *[(k.lower().encode(), v.encode()) for k, v in service.auth.items()],
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }

    async def call() -> None:
        await service.client.app(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"
    assert reads == []  # refused on its declared length, before a byte was read
    assert service.scheduler.jobs == []


def test_chunked_body_over_limit_is_413(tmp_path: Path) -> None:
    service = Service(tmp_path, max_body_bytes=2048)

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = service.client.post(URL, content=chunks(), headers=service.auth)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, None, "request_too_large")
    assert service.scheduler.jobs == []


def test_generation_failure_is_500_in_the_envelope(service: Service) -> None:
    service.scheduler.fail_with = GenerationFailed("model tiny-sd failed to generate")
    assert_error(service.generate({"prompt": "x"}), 500, None, "generation_failed")


def test_an_unreachable_scheduler_is_a_503_to_retry_without_internals(service: Service) -> None:
    # What a handle raises when the scheduler's actor died (Serve restarts it).
    service.scheduler.fail_with = RuntimeError("ActorDiedError: secret internal detail")
    response = service.generate({"prompt": "x"})
    assert_error(response, 503, None, "model_unavailable")
    assert response.headers["retry-after"] == "2"
    assert "secret" not in response.text


def test_unknown_route_is_404_envelope(service: Service) -> None:
    assert_error(service.client.get("/v1/nothing"), 404, None, "unknown_url")


def test_wrong_method_is_405_client_error(service: Service) -> None:
    response = service.client.get(URL, headers=service.auth)
    assert_error(response, 405, None, "http_error")
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_url_response_downloads_until_it_expires(service: Service) -> None:
    body = service.generate({"prompt": "x", "response_format": "url", "n": 2}).json()
    urls = [item["url"] for item in body["data"]]
    assert len(urls) == 2 and all("b64_json" not in item for item in body["data"])
    path = urlsplit(urls[0])
    local = f"{path.path}?{path.query}"
    ok = service.client.get(local)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert ok.content.startswith(b"\x89PNG")

    tampered = local.replace("signature=", "signature=0")
    assert_error(service.client.get(tampered), 403, None, "invalid_signature")
    non_ascii = local.replace("signature=", "signature=%C3%A9")  # not a 500
    assert_error(service.client.get(non_ascii), 403, None, "invalid_signature")
    other_file = local.replace(path.path.split("/")[3], "img_" + "0" * 32 + ".png")
    assert service.client.get(other_file).status_code == 403

    service.clock.advance(3601)
    assert_error(service.client.get(local), 403, None, "url_expired")


def test_jpeg_output(service: Service) -> None:
    """The router encodes the worker's raw pixels in the format and quality asked."""
    jpeg = {"prompt": "x", "output_format": "jpeg", "output_compression": 80}
    inline = service.generate(jpeg)
    assert inline.status_code == 200, inline.text
    assert inline.json()["output_format"] == "jpeg"
    assert base64.b64decode(inline.json()["data"][0]["b64_json"]).startswith(JPEG_MAGIC)

    stored = service.generate(jpeg | {"response_format": "url"})
    assert stored.status_code == 200, stored.text
    path = urlsplit(stored.json()["data"][0]["url"])
    download = service.client.get(f"{path.path}?{path.query}")
    assert download.status_code == 200 and download.headers["content-type"] == "image/jpeg"
    assert download.content.startswith(JPEG_MAGIC)
    assert [(job.output_format, job.output_compression) for job in service.scheduler.jobs] == [
        ("jpeg", 80),
        ("jpeg", 80),
    ]


def test_health(service: Service) -> None:
    response = service.client.get("/healthz")
    assert response.status_code == 200 and response.json()["models"] == ["tiny-sd", "tiny-wan"]


def test_unexpected_error_is_500_without_internals(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_put(*args: object) -> str:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(service.gateway.artifacts, "put", broken_put)
    response = service.generate({"prompt": "x", "response_format": "url"})
    assert_error(response, 500, None, "internal_error")
    assert "secret" not in response.text
    assert response.headers["x-request-id"] in response.json()["error"]["message"]
