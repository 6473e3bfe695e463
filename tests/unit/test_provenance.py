"""C2PA manifests on outputs: every image format and MP4 read back with ``c2pa.Reader``
as valid (signed by the local test certificate, which readers call untrusted), naming
mediagate and the model; edits list their input as the parent ingredient; the prompt
only when the operator opts in; through the router for b64, URL, edits and streamed
finals."""

from __future__ import annotations

import base64
import io
import json
import stat
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from mediagate.provenance.certificates import ensure_local_certificate, local_certificate_pem
from mediagate.provenance.settings import ProvenanceSettings
from mediagate.provenance.signing import (
    GENERATION_LABEL,
    ContentSigner,
    Provenance,
    image_format_of,
    read_manifest,
)
from tests.unit.harness import Service

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def signer() -> ContentSigner:
    chain, key = local_certificate_pem()
    return ContentSigner(ProvenanceSettings(), chain, key)


def image_file(file_format: str, size: int = 64, color: Any = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, PIL_FORMATS[file_format])
    return buffer.getvalue()


def active(store: dict[str, Any]) -> dict[str, Any]:
    manifest: dict[str, Any] = store["manifests"][store["active_manifest"]]
    return manifest


def assertion(manifest: dict[str, Any], label: str) -> dict[str, Any]:
    [found] = [a["data"] for a in manifest["assertions"] if a["label"].startswith(label)]
    return found


def check_signed(data: bytes, file_format: str, model: str, action: str) -> dict[str, Any]:
    store = read_manifest(data, file_format)
    assert store["validation_state"] == "Valid", store.get("validation_status")
    # the only complaint: the local test certificate is not on any trust list
    codes = {status["code"] for status in store.get("validation_status", [])}
    assert codes <= {"signingCredential.untrusted"}, codes
    manifest = active(store)
    assert manifest["claim_generator_info"][0]["name"] == "mediagate"
    assert assertion(manifest, GENERATION_LABEL)["model"] == model
    actions = [a["action"] for a in assertion(manifest, "c2pa.actions")["actions"]]
    assert actions[-1] == action
    return manifest


@pytest.mark.parametrize("file_format", ["png", "jpeg", "webp"])
def test_every_image_format_is_signed_and_still_an_image(
    signer: ContentSigner, file_format: str
) -> None:
    original = image_file(file_format)
    signed = signer.sign(original, file_format, Provenance(model="tiny-sd", prompt="private"))
    manifest = check_signed(signed, file_format, "tiny-sd", "c2pa.created")
    assert "prompt" not in assertion(manifest, GENERATION_LABEL)  # prompts stay private
    assert "private" not in json.dumps(read_manifest(signed, file_format))
    image = Image.open(io.BytesIO(signed))
    assert (image.format, image.size) == (PIL_FORMATS[file_format], (64, 64))
    assert image_format_of(signed) == file_format


def test_an_mp4_is_signed_and_still_plays(signer: ContentSigner) -> None:
    import av
    import numpy as np

    from models.encoding import encode_mp4

    frames = (np.random.default_rng(1).random((9, 32, 32, 3)) * 255).astype(np.uint8)
    signed = signer.sign(encode_mp4(frames, 8), "mp4", Provenance(model="tiny-wan"))
    check_signed(signed, "mp4", "tiny-wan", "c2pa.created")
    with av.open(io.BytesIO(signed), mode="r") as container:
        assert len(list(container.decode(video=0))) == 9


def test_an_edit_names_its_input_as_the_parent(signer: ContentSigner) -> None:
    parent = image_file("jpeg", color=(1, 2, 3))
    signed = signer.sign(
        image_file("png"), "png", Provenance(model="tiny-sd", action="c2pa.edited", parent=parent)
    )
    manifest = check_signed(signed, "png", "tiny-sd", "c2pa.edited")
    [ingredient] = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["format"] == "image/jpeg"


def test_the_prompt_only_when_the_operator_opts_in() -> None:
    chain, key = local_certificate_pem()
    signer = ContentSigner(ProvenanceSettings(include_prompt=True), chain, key)
    signed = signer.sign(image_file("png"), "png", Provenance(model="m", prompt="a red fox"))
    assert assertion(active(read_manifest(signed, "png")), GENERATION_LABEL)["prompt"] == (
        "a red fox"
    )


def test_a_key_that_does_not_match_its_certificate_fails_at_start() -> None:
    chain, _ = local_certificate_pem()
    _, other_key = local_certificate_pem()
    with pytest.raises(Exception, match=r"(?i)sign|key|certificate"):
        ContentSigner(ProvenanceSettings(), chain, other_key)


def test_the_local_certificate_is_made_once_and_its_key_kept_private(tmp_path: Path) -> None:
    files = ensure_local_certificate(tmp_path / "secrets")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    chain = files.chain.read_bytes()
    assert chain.count(b"BEGIN CERTIFICATE") == 2 and b"PRIVATE" not in chain
    assert ensure_local_certificate(tmp_path / "secrets").chain.read_bytes() == chain
    ContentSigner.from_files(
        ProvenanceSettings(certificate_chain=str(files.chain), private_key=str(files.key))
    )


def test_the_router_signs_b64_url_edits_and_streamed_finals(
    tmp_path: Path, signer: ContentSigner
) -> None:
    service = Service(tmp_path, signer=signer)
    client = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=service.key,
        http_client=service.client,
        max_retries=0,
    )
    inline = client.images.generate(prompt="a lighthouse", output_format="webp")
    assert inline.data and inline.data[0].b64_json
    check_signed(base64.b64decode(inline.data[0].b64_json), "webp", "tiny-sd", "c2pa.created")

    linked = service.generate({"prompt": "a lighthouse", "response_format": "url"}).json()
    downloaded = service.client.get(linked["data"][0]["url"])
    assert downloaded.status_code == 200
    check_signed(downloaded.content, "png", "tiny-sd", "c2pa.created")

    edited = client.images.edit(image=("in.png", image_file("png"), "image/png"), prompt="x")
    assert edited.data and edited.data[0].b64_json
    manifest = check_signed(
        base64.b64decode(edited.data[0].b64_json), "png", "tiny-sd", "c2pa.edited"
    )
    assert [i["relationship"] for i in manifest["ingredients"]] == ["parentOf"]

    stream = client.images.generate(prompt="a lighthouse", stream=True, partial_images=1)
    events = list(stream)
    finals = [e for e in events if e.type == "image_generation.completed"]
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert len(finals) == 1
    check_signed(base64.b64decode(finals[0].b64_json), "png", "tiny-sd", "c2pa.created")
    for partial in partials:  # previews carry no manifest
        with pytest.raises(Exception):  # noqa: B017 - c2pa raises its own error types
            read_manifest(base64.b64decode(partial.b64_json), "png")
