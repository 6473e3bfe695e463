"""Every kind of answer validated against OpenAI's published schemas (a vendored copy
of the components of OpenAI's OpenAPI document, ``tests/schemas/openai-schemas.json``,
from openai/openai-openapi's openapi.yaml of 2026-08-21).

The one deliberate difference: sizes. Open models make sizes OpenAI's enums do not
list (64x64 here), so the ``size`` enums of images and videos are left out.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from PIL import Image

from tests.unit.harness import Service

SCHEMAS = json.loads((Path(__file__).parents[1] / "schemas" / "openai-schemas.json").read_text())


def validator(name: str) -> jsonschema.protocols.Validator:
    """A validator of schema ``name``, sizes opened up, references resolved in the file."""
    document = copy.deepcopy(SCHEMAS)
    schemas = document["components"]["schemas"]
    schemas["VideoSize"] = {"type": "string", "pattern": r"^\d+x\d+$"}
    images_size = schemas["ImagesResponse"]["properties"]["size"]
    images_size.pop("enum")
    images_size["pattern"] = r"^\d+x\d+$"
    schema = {**schemas[name], "components": document["components"]}
    return jsonschema.Draft202012Validator(schema)


def check(name: str, answer: Any) -> None:
    errors = sorted(validator(name).iter_errors(answer), key=lambda error: list(error.path))
    assert not errors, [(list(error.path), error.message) for error in errors]


def png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(tmp_path)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x"},
        {"prompt": "x", "quality": "auto", "output_format": "webp", "output_compression": 50},
        {"prompt": "x", "quality": "high", "response_format": "url"},
        {"prompt": "x", "num_inference_steps": 3},
    ],
)
def test_generations(service: Service, body: dict[str, Any]) -> None:
    response = service.generate(body)
    assert response.status_code == 200, response.text
    check("ImagesResponse", response.json())
    assert response.json()["quality"] in ("low", "medium", "high")  # what was done


def test_edits(service: Service) -> None:
    response = service.client.post(
        "/v1/images/edits",
        files=[("image", ("a.png", png()))],
        data={"prompt": "x", "quality": "low"},
        headers=service.auth,
    )
    assert response.status_code == 200, response.text
    check("ImagesResponse", response.json())
    assert response.json()["quality"] == "low"


def test_models(service: Service) -> None:
    listing = service.client.get("/v1/models", headers=service.auth).json()
    check("ListModelsResponse", listing)
    for model in listing["data"]:
        check("Model", model)


def test_videos(service: Service) -> None:
    created = service.client.post(
        "/v1/videos", json={"prompt": "waves", "seconds": "4"}, headers=service.auth
    )
    assert created.status_code == 200, created.text
    check("VideoResource", created.json())
    video_id = created.json()["id"]
    check(
        "VideoResource", service.client.get(f"/v1/videos/{video_id}", headers=service.auth).json()
    )
    check("VideoListResource", service.client.get("/v1/videos", headers=service.auth).json())
    deleted = service.client.delete(f"/v1/videos/{video_id}", headers=service.auth)
    check("DeletedVideoResource", deleted.json())


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("post", "/v1/images/generations", {"json": {"prompt": ""}}),
        ("post", "/v1/images/generations", {"json": {"prompt": "x"}, "headers": {}}),
        ("get", "/v1/videos/video_missing", {}),
        ("post", "/v1/images/edits", {"data": {"prompt": "x"}}),
    ],
)
def test_errors(service: Service, method: str, path: str, kwargs: dict[str, Any]) -> None:
    kwargs.setdefault("headers", service.auth)
    response = getattr(service.client, method)(path, **kwargs)
    assert response.status_code >= 400
    check("ErrorResponse", response.json())
