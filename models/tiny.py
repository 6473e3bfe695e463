"""Tiny random-weight pipelines built from the real diffusers and transformers classes.

No machine that builds or tests mediagate has a GPU or can download weights, so
``tiny://NAME`` sources are assembled here (a few-layer UNet, a VAE, a CLIP text
encoder, a tokenizer over a generated vocabulary), written once with
``save_pretrained`` into a cache, and then loaded with ``from_pretrained`` exactly
like a real model. They produce noise, quickly, through the real code path.
Weights are seeded, so every machine builds the same model.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MODEL_INDEX = "model_index.json"


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [byte for byte in range(256) if byte not in printable]
    return [chr(code) for code in printable] + [chr(256 + index) for index in range(len(extra))]


def write_clip_tokenizer_files(directory: Path) -> None:
    """A CLIP vocabulary of single bytes (plus end-of-word forms) and no merges."""
    alphabet = _byte_level_alphabet()
    tokens = [*alphabet, *(f"{char}</w>" for char in alphabet), "<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")


def build_stable_diffusion(target: Path) -> None:
    """A Stable-Diffusion pipeline: UNet 32/64, VAE 32/64, 5-layer CLIP text encoder of width 32."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = Path(scratch)
        write_clip_tokenizer_files(tokenizer_dir)
        tokenizer = CLIPTokenizer(
            str(tokenizer_dir / "vocab.json"),
            str(tokenizer_dir / "merges.txt"),
            model_max_length=77,
        )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(target)  # type: ignore[attr-defined]


TINY_BUILDERS: dict[str, Callable[[Path], None]] = {
    "stable-diffusion": build_stable_diffusion,
}


def ensure_tiny_pipeline(name: str, cache_root: Path) -> Path:
    """The directory of tiny model ``name``, built on first use (safe across processes)."""
    builder = TINY_BUILDERS.get(name)
    if builder is None:
        known = ", ".join(sorted(TINY_BUILDERS))
        raise ValueError(f"unknown tiny model {name!r}; known: {known}")
    target = cache_root / name
    if (target / MODEL_INDEX).exists():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MODEL_INDEX).exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root))
        try:
            builder(staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
