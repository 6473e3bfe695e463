"""An AutoencoderKL whose weights are set by hand so that it reconstructs its input
(to ~1e-6): the tiny random VAE does not (mean 70/255 off), so it cannot show what an
edit keeps of its photo. Used with a UNet that predicts no noise, it makes diffusers'
image-to-image output exactly the photo plus the noise its ``strength`` adds: the
measure of how close a low-strength edit stays.

How: no downsampling and every residual branch zeroed (conv2 = 0), so the blocks are
identities; the two GroupNorm + SiLU stages are made linear by giving each colour a
group of four channels ``[c, -c, K, -K]`` (mean 0, variance ~K^2/2 whatever the
image: normalising divides by a constant the affine multiplies back) and shifting
by +30 before the SiLU (which is then the identity to 1e-12), -30 after.
"""

from __future__ import annotations

from typing import Any

K = 1000.0
SHIFT = 30.0


def reconstructing_vae(scaling_factor: float) -> Any:
    """A VAE whose latents are the pixels (in [-1, 1]) over ``scaling_factor`` in
    channels 0-2 (channel 3 is 0), with a posterior of std ~3e-7."""
    import torch
    from diffusers import AutoencoderKL

    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(12,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=3,
        mid_block_add_attention=False,
        scaling_factor=scaling_factor,
    )
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for module in vae.modules():
            if module.__class__.__name__ == "GroupNorm":
                module.weight.fill_(1.0)  # the block norms (their branches are zeroed anyway)
        spread(vae.encoder.conv_in, scale=1.0)
        linear_norm(vae.encoder.conv_norm_out)
        for colour in range(3):  # mean of latent channel c = pixel c / scaling_factor
            vae.encoder.conv_out.weight[colour, 4 * colour, 1, 1] = 1.0 / scaling_factor
            vae.encoder.conv_out.bias[colour] = -SHIFT / scaling_factor
        vae.encoder.conv_out.bias[4:] = -30.0  # log-variance: std e^-15
        for quant in (vae.quant_conv, vae.post_quant_conv):
            if quant is not None:
                channels = quant.weight.shape[0]
                quant.weight[:, :, 0, 0] = torch.eye(channels)
        spread(vae.decoder.conv_in, scale=scaling_factor)
        linear_norm(vae.decoder.conv_norm_out)
        for colour in range(3):
            vae.decoder.conv_out.weight[colour, 4 * colour, 1, 1] = 1.0
            vae.decoder.conv_out.bias[colour] = -SHIFT
    return vae


def spread(conv: Any, *, scale: float) -> None:
    """Input channel c -> the group ``[c, -c, K, -K]`` (times ``scale``)."""
    for colour in range(3):
        conv.weight[4 * colour, colour, 1, 1] = scale
        conv.weight[4 * colour + 1, colour, 1, 1] = -scale
        conv.bias[4 * colour + 2] = K
        conv.bias[4 * colour + 3] = -K


def linear_norm(norm: Any) -> None:
    """GroupNorm over ``[c, -c, K, -K]`` groups, undone by its affine, shifted by +30."""
    norm.weight.fill_(K / 2**0.5)
    norm.bias.fill_(SHIFT)


def without_noise_prediction(unet: Any) -> None:
    """A UNet that predicts zero noise: its denoising steps leave the latents as they are."""
    import torch

    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
