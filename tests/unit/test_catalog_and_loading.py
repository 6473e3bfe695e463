"""Catalog parsing, device choice and pipeline loading from every source kind."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mediagate.protocol.errors import ModelUnavailable
from models.catalog import load_catalog, parse_catalog
from models.device import choose_placement
from models.loading import load_pipeline, resolve_weights


def test_shipped_catalog_parses_with_one_tiny_image_model() -> None:
    catalog = load_catalog()
    spec = catalog.default_for("text-to-image")
    assert spec is not None and spec.id == "tiny-sd"
    assert spec.source == "tiny://stable-diffusion" and spec.default_size == (64, 64)
    assert not any(s.source.startswith("simulated://") for s in catalog.models.values())


def entry(**fields: object) -> dict[str, object]:
    return {"models": {"m": {"task": "text-to-image", "source": "tiny://x", **fields}}}


@pytest.mark.parametrize(
    "fields",
    [
        {"source": "ftp://weights"},
        {"task": "text-to-audio"},
        {"defaults": {"size": "huge"}},
        {"defaults": {"size": "2048x2048"}},
        {"caps": {"max_n": 11}},
        {"unknown_key": 1},
        {"dtype": "int8"},
        {"tasks": ["image-to-image"]},  # without its own task
        {"tasks": ["text-to-image", "outpaint"]},
    ],
)
def test_bad_catalog_entries_are_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        parse_catalog(entry(**fields))


def test_tasks_say_what_a_model_serves() -> None:
    catalog = load_catalog()
    assert catalog.models["tiny-sd"].tasks == ["text-to-image", "image-to-image", "inpaint"]
    # image-to-video follows the video section's pipeline class
    assert catalog.models["tiny-wan"].tasks == ["text-to-video", "image-to-video"]
    assert parse_catalog(entry()).models["m"].tasks == ["text-to-image"]
    video = {"task": "text-to-video", "source": "tiny://x", "video": {}}
    with pytest.raises(ValidationError, match="text-to-image models only"):
        parse_catalog({"models": {"v": {**video, "tasks": ["text-to-video", "inpaint"]}}})


def test_bad_model_id_and_default_are_rejected() -> None:
    with pytest.raises(ValidationError):
        parse_catalog({"models": {"Bad Id": {"task": "text-to-image", "source": "tiny://x"}}})
    with pytest.raises(ValidationError):
        parse_catalog({**entry(), "default_models": {"text-to-image": "missing"}})


def test_relative_local_source_resolves_against_the_catalog_file(tmp_path: Path) -> None:
    (tmp_path / "catalog.yaml").write_text(
        "models:\n  local:\n    task: text-to-image\n    source: weights/sd\n"
    )
    spec = load_catalog(tmp_path / "catalog.yaml").models["local"]
    assert spec.source == str(tmp_path / "weights" / "sd")


def test_placement_cpu_is_always_float32() -> None:
    assert (
        choose_placement("float16", cuda_available=False, bf16_supported=False).dtype == "float32"
    )
    placement = choose_placement("auto", cuda_available=False, bf16_supported=False)
    assert (placement.device, placement.dtype) == ("cpu", "float32")


def test_placement_gpu_honours_requested_half_precision() -> None:
    assert choose_placement("auto", cuda_available=True, bf16_supported=True).dtype == "bfloat16"
    assert choose_placement("auto", cuda_available=True, bf16_supported=False).dtype == "float16"
    gpu = choose_placement("float16", cuda_available=True, bf16_supported=True)
    assert (gpu.device, gpu.dtype) == ("cuda", "float16")


def test_missing_local_directory_is_a_clear_error(tmp_path: Path) -> None:
    spec = parse_catalog(entry(source=str(tmp_path / "nothing"))).models["m"]
    with pytest.raises(ModelUnavailable, match="not a diffusers pipeline directory"):
        resolve_weights(spec, tmp_path)


def test_unknown_tiny_model_is_a_clear_error(tmp_path: Path) -> None:
    spec = parse_catalog(entry(source="tiny://nope")).models["m"]
    with pytest.raises(ModelUnavailable, match="unknown tiny model"):
        resolve_weights(spec, tmp_path)


def test_hub_model_absent_offline_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = parse_catalog(
        entry(source="hf://stabilityai/sd-turbo", pipeline_class="StableDiffusionPipeline")
    ).models["m"]
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE is set"):
        load_pipeline(spec, cache_dir=tmp_path)


def test_unknown_pipeline_class_is_a_clear_error(tmp_path: Path) -> None:
    spec = parse_catalog(entry(pipeline_class="NoSuchPipeline")).models["m"]
    with pytest.raises(ModelUnavailable, match="no pipeline class"):
        load_pipeline(spec, cache_dir=tmp_path)


def test_tiny_model_is_built_once_then_loaded_like_any_directory(tmp_path: Path) -> None:
    catalog = load_catalog()
    spec = catalog.models["tiny-sd"]
    pipeline = load_pipeline(spec, cache_dir=tmp_path)
    directory = tmp_path / "tiny" / "stable-diffusion"
    assert (directory / "model_index.json").exists()
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    stamp = (directory / "model_index.json").stat().st_mtime_ns

    # The same weights as a plain local directory source: the real from_pretrained path.
    local = parse_catalog(
        entry(source=str(directory), pipeline_class="StableDiffusionPipeline")
    ).models["m"]
    reloaded = load_pipeline(local, cache_dir=tmp_path)
    assert (directory / "model_index.json").stat().st_mtime_ns == stamp
    out = reloaded(prompt="a cat", width=32, height=32, num_inference_steps=1, output_type="pil")
    assert out.images[0].size == (32, 32)
