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
from typing import Any

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


def _clip_tokenizer() -> Any:
    """CLIP's tokenizer over the files ``write_clip_tokenizer_files`` writes."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = Path(scratch)
        write_clip_tokenizer_files(tokenizer_dir)
        return CLIPTokenizer(
            str(tokenizer_dir / "vocab.json"),
            str(tokenizer_dir / "merges.txt"),
            model_max_length=77,
        )


def _clip_text_encoder(tokenizer: Any, layers: int, **extra: Any) -> Any:
    """A CLIP text encoder of width 32 with ``layers`` layers (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=layers,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            **extra,
        )
    )


# The tiny Stable Diffusion family's UNet (without its cross-attention width, which
# follows the text encoders) and VAE: SD and SDXL share them.
TINY_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
}
TINY_VAE: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
}


def build_stable_diffusion(target: Path) -> None:
    """A Stable-Diffusion pipeline: UNet 32/64, VAE 32/64, 5-layer CLIP text encoder of width 32."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    unet = UNet2DConditionModel(**TINY_UNET, cross_attention_dim=32)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = _clip_text_encoder(tokenizer, layers=5)
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


def build_stable_diffusion_xl(target: Path) -> None:
    """An SDXL pipeline: the tiny SD UNet with SDXL's added text/time conditioning, two
    CLIP text encoders of width 32 (the second with a projection), the tiny SD VAE."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    unet = UNet2DConditionModel(
        **TINY_UNET,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # time ids + pooled text
        cross_attention_dim=64,  # both encoders' hidden states side by side
    )
    vae = AutoencoderKL(**TINY_VAE)
    second = _clip_text_encoder(tokenizer, layers=5, projection_dim=32)
    pipeline = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=_clip_text_encoder(tokenizer, layers=5),
        text_encoder_2=CLIPTextModelWithProjection(second.config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    pipeline.save_pretrained(target)  # type: ignore[attr-defined]


# The T5-family text encoders of the tiny models (UMT5 for Wan, T5 for FLUX): 2 layers
# of width 32, over ``_character_tokenizer``'s ids (0 pad, 1 end).
TINY_T5: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def _character_tokenizer(max_length: int) -> Any:
    """A T5-style tokenizer over single characters, built with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for code in range(33, 127):
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_wan(target: Path) -> None:
    """A Wan 2.2 "TI2V"-style pipeline: one transformer for text- and image-to-video.

    2-layer Wan transformer, 2-layer UMT5 encoder of width 32, the Wan VAE with
    ``base_dim=3`` (8x spatial, 4x temporal compression). ``expand_timesteps``
    makes ``WanImageToVideoPipeline.from_pipe`` condition on an image through the
    VAE alone, with no CLIP image encoder, as Wan2.2-TI2V-5B does.
    """
    import torch
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = _character_tokenizer(max_length=64)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), decoder_start_token_id=0, **TINY_T5)
    )
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    pipeline = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer,
        expand_timesteps=True,
    )
    pipeline.save_pretrained(target)  # type: ignore[attr-defined]


def build_flux_kontext(target: Path) -> None:
    """A FLUX.1-Kontext-style instruction-edit pipeline: FLUX transformer with 1 double-
    and 1 single-stream block, 2-layer CLIP and T5 encoders of width 32, a 2-block VAE.
    It edits by conditioning on the input image's latents (and generates from text alone
    without one)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, layers=2, projection_dim=32)
    tokenizer_2 = _character_tokenizer(max_length=64)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **TINY_T5))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    pipeline = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    pipeline.save_pretrained(target)  # type: ignore[attr-defined]


TINY_BUILDERS: dict[str, Callable[[Path], None]] = {
    "stable-diffusion": build_stable_diffusion,
    "stable-diffusion-xl": build_stable_diffusion_xl,
    "wan": build_wan,
    "flux-kontext": build_flux_kontext,
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
