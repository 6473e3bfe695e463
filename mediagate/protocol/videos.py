"""OpenAI Videos API: the request and response models of `/v1/videos`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mediagate.protocol.catalog import ModelSpec, parse_size
from mediagate.protocol.errors import InvalidRequest
from mediagate.protocol.images import MAX_SEED


class ImageReference(BaseModel):
    """``input_reference`` as an object (JSON bodies, or ``input_reference[...]`` form fields)."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(
        None, description="A base64 `data:` URL of a PNG, JPEG or WebP image."
    )
    file_id: str | None = Field(None, description="Uploaded files are not supported yet.")


class VideoCreateRequest(BaseModel):
    """``POST /v1/videos`` (JSON or multipart): OpenAI's fields plus open-model extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32000, description="What the video shows.")
    model: str | None = Field(None, description="Catalog model id; the default video model.")
    seconds: str | None = Field(
        None,
        description='Clip length as a string, e.g. `"4"`; the model\'s default if unset.',
    )
    size: str | None = Field(None, description="WIDTHxHEIGHT; the model's default if unset.")
    input_reference: ImageReference | None = Field(
        None, description="An image to start from (multipart uploads arrive as a file)."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Makes results reproducible.")
    negative_prompt: str | None = Field(
        None, max_length=32000, description="What the video should not contain."
    )
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None, ge=0, le=50, description="Classifier-free guidance strength."
    )

    @model_validator(mode="after")
    def _shape(self) -> VideoCreateRequest:
        # ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses
        if self.seconds is not None and not re.fullmatch(r"[0-9]{1,8}", self.seconds.strip()):
            raise InvalidRequest(
                f"`seconds` must be a whole number of seconds as a string, got {self.seconds!r}",
                param="seconds",
            )
        if self.size is not None:
            try:
                parse_size(self.size)
            except ValueError as error:
                raise InvalidRequest(str(error), param="size") from None
        return self

    def resolve(self, spec: ModelSpec) -> dict[str, Any]:
        """Defaults filled in and caps checked; keys follow diffusers' ``__call__`` names."""
        if spec.video is None:  # the catalog refuses such a video model; guard anyway
            raise InvalidRequest(f"model {spec.id} does not generate video", param="model")
        video, caps = spec.video, spec.caps
        seconds = int(self.seconds.strip()) if self.seconds is not None else video.default_seconds
        if seconds not in video.allowed_seconds:
            allowed = ", ".join(f'"{value}"' for value in video.allowed_seconds)
            raise InvalidRequest(
                f"`seconds` must be one of {allowed} for model {spec.id}, got {self.seconds!r}",
                param="seconds",
            )
        width, height = spec.default_size if self.size is None else parse_size(self.size)
        for side_name, side, cap in (
            ("width", width, caps.max_width),
            ("height", height, caps.max_height),
        ):
            if side % caps.size_multiple or not caps.min_side <= side <= cap:
                raise InvalidRequest(
                    f"{side_name} must be a multiple of {caps.size_multiple} between "
                    f"{caps.min_side} and {cap} for model {spec.id}, got {side}",
                    param="size",
                )
        steps = self.num_inference_steps or spec.defaults.num_inference_steps
        if steps > caps.max_steps:
            raise InvalidRequest(
                f"`num_inference_steps` must be at most {caps.max_steps} for model {spec.id}, "
                f"got {steps}",
                param="num_inference_steps",
            )
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": width,
            "height": height,
            "num_frames": video.num_frames(seconds),
            "fps": video.fps,
            "num_inference_steps": steps,
            "guidance_scale": (
                spec.defaults.guidance_scale if self.guidance_scale is None else self.guidance_scale
            ),
            "seconds": seconds,
        }


class VideoRemixRequest(BaseModel):
    """``POST /v1/videos/{id}/remix``: the same video settings and seed, a new prompt."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32000, description="The new prompt.")


class VideoError(BaseModel):
    """Why a video job failed."""

    code: str = Field(description="Machine-readable reason, e.g. `generation_failed`.")
    message: str = Field(description="What happened, for humans.")


class VideoObject(BaseModel):
    """A video job, exactly as the OpenAI Videos API shows it (plus ``queue_position``)."""

    id: str = Field(description="Job id, `video_...`.")
    object: Literal["video"] = Field("video", description="Always `video`.")
    status: Literal["queued", "in_progress", "completed", "failed"] = Field(
        description="The client polls while `queued` or `in_progress`."
    )
    progress: int = Field(description="0-100, from the denoising loop.")
    created_at: int = Field(description="Unix time the job was accepted.")
    completed_at: int | None = Field(None, description="Unix time it completed or failed.")
    expires_at: int | None = Field(None, description="Unix time its content is deleted.")
    model: str = Field(description="Model id.")
    prompt: str = Field(description="The prompt.")
    seconds: str = Field(description="Clip length, as a string.")
    size: str = Field(description="WIDTHxHEIGHT.")
    remixed_from_video_id: str | None = Field(None, description="Source of a remix.")
    error: VideoError | None = Field(None, description="Set when `status` is `failed`.")
    queue_position: int | None = Field(
        None, description="mediagate extension: 1 = next to run, while `queued`."
    )
    model_version: str | None = Field(
        None,
        description="mediagate extension: the version of `model` that made it (that runs "
        "it), once it has started.",
    )


class VideoList(BaseModel):
    """``GET /v1/videos``: a cursor page."""

    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[VideoObject] = Field(description="Jobs on this page.")
    first_id: str | None = Field(None, description="Id of the first job on this page.")
    last_id: str | None = Field(None, description="Pass as `after` for the next page.")
    has_more: bool = Field(description="Whether another page follows.")


class VideoDeleted(BaseModel):
    """``DELETE /v1/videos/{id}``."""

    id: str = Field(description="The deleted job.")
    object: Literal["video.deleted"] = Field("video.deleted", description="Always this.")
    deleted: bool = Field(True, description="Always true.")
