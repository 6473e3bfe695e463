"""Partial images: what a denoising loop's latents look like mid-way, through the VAE.

Streamed requests (``partial_images``) show the picture forming. The previews are
the model's own VAE decode of the latents at that step (no approximation), for the
latent layouts of the image families mediagate ships: 4-D latents (Stable Diffusion,
SDXL, SD3) and FLUX's packed 3-D latents. A pipeline whose latents this does not
know gives no previews (its stream has only the finished images).
"""

from __future__ import annotations

from typing import Any


def can_preview(pipeline: Any, latents: Any) -> bool:
    """Whether ``decode_previews`` knows ``pipeline``'s latents: a VAE with a
    ``scaling_factor``, and 4-D latents or FLUX's packed ones (3-D, unpacked to 4-D;
    Qwen-Image's unpack to video-shaped 5-D ones and get no previews)."""
    vae = getattr(pipeline, "vae", None)
    if vae is None or not hasattr(pipeline, "image_processor"):
        return False
    if getattr(vae.config, "scaling_factor", None) is None:
        return False
    if latents.ndim == 4:
        return True
    flux_packed = type(pipeline).__name__.startswith("Flux")
    return bool(latents.ndim == 3 and flux_packed and hasattr(pipeline, "_unpack_latents"))


def decode_previews(pipeline: Any, latents: Any, *, width: int, height: int) -> list[Any]:
    """PIL images of ``latents`` (a batch of them, as the loop holds them), decoded as
    the pipeline decodes its final latents (``decode_latents``) and post-processed."""
    decoded = decode_latents(pipeline, latents, width=width, height=height)
    return list(pipeline.image_processor.postprocess(decoded, output_type="pil"))


def decode_latents(pipeline: Any, latents: Any, *, width: int, height: int) -> Any:
    """The VAE's pixels (a tensor) of ``latents``, as the pipeline decodes its final
    ones: unpacked (FLUX), un-scaled and shifted as its VAE's config says, decoded."""
    import torch

    vae = pipeline.vae
    config = vae.config
    with torch.no_grad():
        if latents.ndim == 3:  # FLUX packs 2x2 latent patches into a sequence
            latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
        # fp16 VAEs that overflow (SDXL's: force_upcast) decode in float32, as the
        # pipeline does at its end
        upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        latents = latents.to(vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:  # SDXL-style VAEs with latent statistics
            shape = (1, latents.shape[1], 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents)
            std_t = torch.tensor(std).view(shape).to(latents)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0)
        try:
            return vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
