"""OpenAI Images API: the request and response models of `POST /v1/images/generations`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mediagate.protocol.catalog import ModelSpec, parse_size
from mediagate.protocol.errors import InvalidRequest

MAX_SEED = 2**63 - 1


class ImageRequest(BaseModel):
    """What generations and edits share: OpenAI's fields plus open-model extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32000, description="What to draw.")
    model: str | None = Field(
        None, description="Catalog model id; the default image model if unset."
    )
    n: int = Field(1, ge=1, le=10, description="How many images to generate (1-10).")
    size: str = Field("auto", description="WIDTHxHEIGHT, or `auto` for the model's default.")
    quality: Literal["auto", "standard", "low", "medium", "high", "hd"] = Field(
        "auto", description="Maps to denoising steps where the model's catalog entry defines it."
    )
    response_format: Literal["url", "b64_json"] = Field(
        "b64_json", description="Inline base64 bytes, or a signed URL that expires."
    )
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image encoding.")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="JPEG/WebP quality, 0-100 (100 = best, the default)."
    )
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="Diffusion output is opaque: `auto` and `opaque` are accepted."
    )
    user: str | None = Field(None, max_length=256, description="End-user id, for abuse tracking.")
    stream: bool | None = Field(
        None,
        description="Answer as server-sent events: `partial_images` previews while the "
        "image forms, then one completed event per image (always b64_json).",
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=3,
        description="Previews per image to stream (0-3; needs `stream`). Fewer come when "
        "the image has too few steps to space them.",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Makes results reproducible.")
    negative_prompt: str | None = Field(
        None, max_length=32000, description="What the image should not contain."
    )
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None, ge=0, le=50, description="Classifier-free guidance strength."
    )

    @model_validator(mode="after")
    def _supported_combinations(self) -> ImageRequest:
        if self.partial_images and not self.stream:
            raise InvalidRequest(
                "`partial_images` are streamed: set `stream` to true", param="partial_images"
            )
        if self.stream and self.response_format == "url":
            raise InvalidRequest(
                "streamed images are sent inline (b64_json); `response_format: url` is for "
                "unstreamed requests",
                param="response_format",
            )
        if self.background == "transparent":
            raise InvalidRequest(
                "transparent backgrounds are not supported: diffusion output is opaque",
                param="background",
            )
        if self.output_compression is not None and self.output_format == "png":
            raise InvalidRequest(
                "`output_compression` applies to jpeg and webp only, not png",
                param="output_compression",
            )
        if self.size != "auto":
            try:
                parse_size(self.size)
            except ValueError as error:
                raise InvalidRequest(str(error), param="size") from None
        if self.num_inference_steps is not None and self.quality not in ("auto", "standard"):
            raise InvalidRequest(
                "set either `quality` or `num_inference_steps`, not both", param="quality"
            )
        return self

    def to_pipeline_kwargs(
        self, spec: ModelSpec, auto_size: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """Resolve defaults and check caps; keys follow diffusers' ``__call__`` names.
        ``size: auto`` is ``auto_size`` if given (an edit's input), else the model's."""
        caps = spec.caps
        if self.n > caps.max_n:
            raise InvalidRequest(
                f"`n` must be at most {caps.max_n} for model {spec.id}, got {self.n}", param="n"
            )
        if self.size == "auto":
            width, height = auto_size or spec.default_size
        else:
            width, height = parse_size(self.size)
        for side_name, side, cap in (
            ("width", width, caps.max_width),
            ("height", height, caps.max_height),
        ):
            if side % caps.size_multiple:
                raise InvalidRequest(
                    f"{side_name} must be a multiple of {caps.size_multiple}, got {side}",
                    param="size",
                )
            if not caps.min_side <= side <= cap:
                raise InvalidRequest(
                    f"{side_name} must be between {caps.min_side} and {cap} for model {spec.id}, "
                    f"got {side}",
                    param="size",
                )
        steps = self._resolve_steps(spec)
        if steps > caps.max_steps:
            raise InvalidRequest(
                f"`num_inference_steps` must be at most {caps.max_steps} for model {spec.id}, "
                f"got {steps}",
                param="num_inference_steps",
            )
        guidance = (
            spec.defaults.guidance_scale if self.guidance_scale is None else self.guidance_scale
        )
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "num_images_per_prompt": self.n,
        }

    def _resolve_steps(self, spec: ModelSpec) -> int:
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        if self.quality in ("auto", "standard"):
            return spec.defaults.num_inference_steps
        quality = (
            "high" if self.quality == "hd" and "hd" not in spec.quality_steps else self.quality
        )
        if quality not in spec.quality_steps:
            accepted = ", ".join(["auto", "standard", *spec.quality_steps]) or "auto"
            raise InvalidRequest(
                f"model {spec.id} accepts quality {accepted}; got {self.quality!r}", param="quality"
            )
        return spec.quality_steps[quality]


class ImageGenerationRequest(ImageRequest):
    """``POST /v1/images/generations``."""

    moderation: Literal["auto", "low"] | None = Field(
        None,
        description="Moderation level: `auto` (the default) or `low` (less restrictive; "
        "only on tiers that allow it, else a 400).",
    )
    style: Literal["vivid", "natural"] | None = Field(
        None, description="A DALL-E 3 option with no meaning for diffusion models: rejected if set."
    )

    @model_validator(mode="after")
    def _no_style(self) -> ImageGenerationRequest:
        if self.style is not None:
            raise InvalidRequest(
                "`style` is a DALL-E 3 option; diffusion models take a `negative_prompt` instead",
                param="style",
            )
        return self


class ImageEditRequest(ImageRequest):
    """``POST /v1/images/edits`` (multipart: the form's text fields; the files apart).
    ``size: auto`` is the input's size, scaled into the model's limits."""

    input_fidelity: Literal["high", "low"] | None = Field(
        None,
        description="Accepted for compatibility: how closely the edit keeps the input is "
        "`strength` for diffusion models.",
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="How much of the input is redrawn (diffusers' `strength`): the share of "
        "`num_inference_steps` that runs, from the input's noised latents. Default 0.8 "
        "without a mask, 1.0 with one.",
    )

    def resolved_strength(self, *, masked: bool) -> float:
        return self.strength if self.strength is not None else (1.0 if masked else 0.8)


class ImageData(BaseModel):
    """One generated image: inline bytes or a URL."""

    b64_json: str | None = Field(None, description="Base64 of the encoded image.")
    url: str | None = Field(None, description="Signed URL; it expires (an hour by default).")
    revised_prompt: str | None = Field(None, description="Always null: prompts are not rewritten.")


class ImagesResponse(BaseModel):
    """The answer to an image generation."""

    created: int = Field(description="Unix time the images were made.")
    data: list[ImageData] = Field(description="The images, in order.")
    output_format: Literal["png", "jpeg", "webp"] = Field(description="Encoding of every image.")
    size: str = Field(description="WIDTHxHEIGHT of every image.")
    quality: Literal["low", "medium", "high"] = Field(
        description="The quality that was made: the steps run, named as the model names them."
    )
    background: Literal["opaque"] = Field("opaque", description="Diffusion output is opaque.")
