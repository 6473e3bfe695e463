"""Instruction-edit models (FLUX.1 Kontext, Qwen-Image-Edit): the tiny FLUX-Kontext-style
pipeline built from diffusers' real classes edits by conditioning on the photo (no
`strength`), generates from text alone, and streams previews of its packed latents; the
router refuses `strength` for it and text-to-image for an edit-only model; and every
real model the shipped catalog lists in comments is a valid entry whose pipeline class
diffusers has."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from deployments.workers.image_steps import PreviewPlan
from deployments.workers.text_to_image import TextToImage, generate_batch
from mediagate.protocol.catalog import Catalog, ModelSpec
from mediagate.protocol.work import ImageJob, PartialImage, RawImage
from models.catalog import load_catalog, parse_catalog
from tests.fakes import LocalHandle
from tests.unit.harness import Service
from tests.unit.test_image_edits import png

SHIPPED = resources.files("models").joinpath("catalog.yaml").read_text()


def commented_entries() -> dict[str, dict[str, Any]]:
    """The model entries the shipped catalog lists commented out, parsed: each line that
    starts a commented block at its left edge (an entry's name, or prose) starts a block."""
    blocks: list[list[str]] = []
    for line in SHIPPED.splitlines():
        text = line[4:] if line.startswith("  # ") else "" if line.rstrip() == "  #" else None
        if text is None or (text and not text.startswith(" ")):
            blocks.append([])
        if text is not None and blocks:
            blocks[-1].append(text)
    entries = {}
    for block in blocks:
        try:
            parsed = yaml.safe_load("\n".join(block))
        except yaml.YAMLError:
            continue  # prose
        if isinstance(parsed, dict) and len(parsed) == 1:
            ((name, entry),) = parsed.items()
            if isinstance(entry, dict) and "source" in entry:
                entries[name] = entry
    return entries


def test_every_commented_model_is_a_valid_entry_of_a_real_pipeline_class() -> None:
    import diffusers

    entries = commented_entries()
    assert {"tiny-kontext", "flux-kontext", "qwen-image-edit", "sdxl", "wan-1.3b"} <= set(entries)
    for name, entry in entries.items():
        spec = ModelSpec.model_validate({"id": name, **entry})
        assert hasattr(diffusers, spec.pipeline_class), (name, spec.pipeline_class)
    assert ModelSpec.model_validate({"id": "q", **entries["qwen-image-edit"]}).tasks == [
        "image-to-image"
    ]


@pytest.fixture(scope="module")
def kontext_spec() -> ModelSpec:
    return ModelSpec.model_validate({"id": "tiny-kontext", **commented_entries()["tiny-kontext"]})


@pytest.fixture(scope="module")
def kontext(kontext_spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> TextToImage:
    cache = tmp_path_factory.mktemp("models")
    return TextToImage(kontext_spec, cache_dir=str(cache), torch_threads=1)


def photo(colour: tuple[int, int, int]) -> RawImage:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :32] = colour
    pixels[:, 32:] = (255 - colour[0], 128, colour[2] // 2)
    return RawImage(mode="RGB", width=64, height=64, pixels=pixels.tobytes())


def pixels(raw: RawImage) -> np.ndarray:
    return np.frombuffer(raw.pixels, np.uint8).astype(int)


def edit_job(name: str, image: RawImage, **fields: Any) -> ImageJob:
    values: dict[str, Any] = {
        "request_id": name,
        "prompt": "make it night",
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
        "guidance_scale": 2.5,
        "num_images_per_prompt": 1,
        "seed": 3,
        "output_format": "png",
        "task": "image-to-image",
        "init_image": image,
    }
    return ImageJob(**(values | fields))


def test_the_tiny_kontext_model_edits_by_conditioning_on_the_photo(kontext: TextToImage) -> None:
    pipeline = kontext.pipelines["image-to-image"]
    assert pipeline is kontext.pipeline  # its own pipeline: nothing built beside it
    red, blue = photo((220, 20, 20)), photo((20, 20, 220))
    [first], [second] = (
        generate_batch(pipeline, [edit_job("a", image)], fixed=kontext.spec.pipeline_arguments)
        for image in (red, blue)
    )
    assert (first.images[0].width, first.images[0].height) == (64, 64)
    difference = np.abs(pixels(first.images[0]) - pixels(second.images[0]))
    assert difference.mean() > 0.1  # same seed and prompt: only the photo differs (0.38)
    # Batched, each edit keeps its own photo: the pixels it has alone (to float rounding).
    both = generate_batch(
        pipeline,
        [edit_job("a", red), edit_job("b", blue)],
        fixed=kontext.spec.pipeline_arguments,
    )
    for batched, alone in zip(both, (first, second), strict=True):
        assert np.abs(pixels(batched.images[0]) - pixels(alone.images[0])).max() <= 2


def test_the_tiny_kontext_model_generates_and_streams_previews(kontext: TextToImage) -> None:
    job = edit_job("t2i", photo((1, 2, 3)), partial_images=2, num_inference_steps=6)
    job = job.model_copy(update={"task": "text-to-image", "init_image": None, "width": 48})
    made: list[PartialImage] = []
    [result] = generate_batch(
        kontext.pipeline,
        [job],
        previews=PreviewPlan([job], made.append),
        fixed=kontext.spec.pipeline_arguments,
    )
    assert (result.images[0].width, result.images[0].height) == (48, 64)
    assert [p.partial_image_index for p in made] == [0, 1]
    assert all((p.image.width, p.image.height) == (48, 64) for p in made)  # unpacked latents


def kontext_service(tmp_path: Path, kontext_spec: ModelSpec, **changes: Any) -> Service:
    spec = kontext_spec.model_copy(update=changes)
    shipped = load_catalog()
    catalog = Catalog(
        models={**shipped.models, spec.id: spec}, default_models=shipped.default_models
    )
    service = Service(tmp_path, catalog=catalog)
    service.gateway.schedulers[spec.id] = LocalHandle(service.scheduler)
    return service


def test_the_router_sends_instruction_edits_without_strength(
    tmp_path: Path, kontext_spec: ModelSpec
) -> None:
    service = kontext_service(tmp_path, kontext_spec)
    files = [("image", ("a.png", png(64, 64)))]
    refused = service.client.post(
        "/v1/images/edits",
        files=files,
        data={"prompt": "x", "model": "tiny-kontext", "strength": "0.5"},
        headers=service.auth,
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "strength"
    accepted = service.client.post(
        "/v1/images/edits",
        files=files,
        data={"prompt": "make it night", "model": "tiny-kontext"},
        headers=service.auth,
    )
    assert accepted.status_code == 200, accepted.text
    [job] = service.scheduler.jobs
    assert (job.task, job.strength, job.init_image is not None) == ("image-to-image", None, True)


def test_an_edit_only_model_refuses_generations(tmp_path: Path, kontext_spec: ModelSpec) -> None:
    service = kontext_service(tmp_path, kontext_spec, tasks=["image-to-image"])
    response = service.generate({"prompt": "x", "model": "tiny-kontext"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"
    assert service.scheduler.jobs == []


def test_catalog_rules_for_instruction_models() -> None:
    base = {"task": "text-to-image", "source": "tiny://flux-kontext"}
    with pytest.raises(ValueError, match="must list image-to-image"):
        ModelSpec.model_validate({"id": "k", **base, "edit_by": "instruction"})
    with pytest.raises(ValueError, match="must include the model's task"):
        ModelSpec.model_validate({"id": "k", **base, "tasks": ["image-to-image"]})
    edit_only = {**base, "tasks": ["image-to-image"], "edit_by": "instruction"}
    with pytest.raises(ValueError, match="does not serve text-to-image"):
        parse_catalog({"models": {"k": edit_only}, "default_models": {"text-to-image": "k"}})
