"""Plain data that crosses Ray handles between router, scheduler and workers.

Frozen pydantic models of resolved work (no defaults left to guess) and its
result: raw pixels as bytes, never PIL images or tensors.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mediagate.protocol.media import ImageFormat

MAX_SEED_DRAWN = 2**32 - 1
ImageTask = Literal["text-to-image", "image-to-image", "inpaint"]


def draw_seed(requested: int | None) -> int:
    """The request's seed, or a random one (recorded, so the result can be reproduced)."""
    return requested if requested is not None else secrets.randbelow(MAX_SEED_DRAWN)


class RawImage(BaseModel):
    """One generated image as uncompressed pixels (PIL's ``tobytes`` layout). Workers
    hand these back and routers encode them: a GPU replica never spends its time on
    PNG/JPEG/WebP (120-170 ms for a 1024x1024 PNG on a CPU core), and the encoding runs
    where CPU capacity scales with traffic."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["RGB", "RGBA", "L"] = Field(description="Pixel layout.")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    pixels: bytes = Field(description="Row-major pixel bytes, width x height x channels.")


class ImageJob(BaseModel):
    """One image request, resolved against its model spec; field names follow diffusers."""

    model_config = ConfigDict(frozen=True)

    request_id: str = Field(description="The router's id for the HTTP request.")
    prompt: str = Field(description="Prompt text.")
    negative_prompt: str | None = Field(None, description="Negative prompt text.")
    width: int = Field(description="Output width in pixels.")
    height: int = Field(description="Output height in pixels.")
    num_inference_steps: int = Field(description="Denoising steps.")
    guidance_scale: float = Field(description="Classifier-free guidance.")
    num_images_per_prompt: int = Field(description="Images to make (the API's `n`).")
    seed: int = Field(description="Image i uses seed + i, so results are reproducible.")
    output_format: ImageFormat = Field(description="Encoding of the result.")
    output_compression: int | None = Field(None, description="JPEG/WebP quality.")
    account_id: str = Field("", description="Who asked: fairness is per account.")
    priority_class: int = Field(0, ge=0, description="From the tier: higher is served first.")
    max_wait_s: float = Field(
        float("inf"), gt=0, description="From the tier: shed rather than wait longer."
    )
    max_queued: int | None = Field(
        None, ge=0, description="From the tier: its class's queue cap in this scheduler."
    )
    task: ImageTask = Field("text-to-image", description="What the pipeline call does.")
    init_image: RawImage | None = Field(
        None, description="The image to edit, RGB at the output size (edits only)."
    )
    mask_image: RawImage | None = Field(
        None, description="Where to repaint, L at the output size, white = repaint (inpaint)."
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="Share of the steps an edit runs (diffusers' `strength`)."
    )
    partial_images: int = Field(
        0,
        ge=0,
        le=3,
        description="Previews to stream per image while it forms (not part of the batch "
        "key: streamed and plain jobs share pipeline calls).",
    )

    @model_validator(mode="after")
    def _inputs_match_the_task(self) -> ImageJob:
        # (An edit's inputs are decoded, and added, only once its quota is reserved.)
        if self.task == "text-to-image" and self.init_image is not None:
            raise ValueError("a generation takes no init_image")
        if self.task != "inpaint" and self.mask_image is not None:
            raise ValueError("only inpaint takes a mask_image")
        return self

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one pipeline call."""
        shape = (self.width, self.height, self.num_inference_steps, self.guidance_scale)
        return shape if self.task == "text-to-image" else (*shape, self.task, self.strength)

    @property
    def images(self) -> int:
        return self.num_images_per_prompt

    @property
    def request_key(self) -> str:
        """Its identity in a scheduler: request ids are the client's, so per account."""
        return request_key(self.account_id, self.request_id)


def request_key(account_id: str, request_id: str) -> str:
    return f"{account_id}/{request_id}"


def preview_steps(steps_run: int, partial_images: int) -> list[int]:
    """After which denoising steps (0-based, of the ``steps_run`` a pipeline call runs)
    a job's partial images are decoded: evenly spaced, never after the last step (the
    final image follows it). Fewer than asked when there are too few steps."""
    spaced = {
        (index + 1) * steps_run // (partial_images + 1) - 1 for index in range(partial_images)
    }
    return sorted(step for step in spaced if 0 <= step < steps_run - 1)


class PartialImage(BaseModel):
    """A preview of one image of a streamed job, decoded from its latents mid-way."""

    model_config = ConfigDict(frozen=True)

    job_index: int = Field(ge=0, description="Which job of the worker's batch it belongs to.")
    image_index: int = Field(ge=0, description="Which of the job's images (0 to n-1).")
    partial_image_index: int = Field(ge=0, description="0-based, in the order they are made.")
    image: RawImage = Field(description="The preview's pixels, at the output size.")


class StreamQueued(BaseModel):
    """The first item of a streamed job: the scheduler admitted it (a refusal is raised
    instead, before anything is streamed)."""

    model_config = ConfigDict(frozen=True)

    estimated_wait_s: float | None = Field(None, description="Admission's estimate of the wait.")


class StepEngineStats(BaseModel):
    """A step-level worker's engine at one moment (issue 17), for the scheduler's
    ``GET /v1/status`` report: what it holds, and its steps over the last few seconds."""

    model_config = ConfigDict(frozen=True)

    at: float = Field(description="Wall-clock time of the snapshot (``time.time()``).")
    seats: int = Field(0, description="Requests it holds, running or paused.")
    paused: int = Field(0, description="Held requests that have started and sat out the last step.")
    paused_bytes: int = Field(
        0, description="Device memory their latents and embeddings hold (not offloaded)."
    )
    offloaded: int = Field(0, description="Held requests whose tensors wait in host memory.")
    offloaded_bytes: int = Field(0, description="Host memory those tensors take.")
    steps_per_s: float = Field(0.0, description="Forward passes per second, recently.")
    images_per_step: float = Field(0.0, description="Mean batch occupancy of those steps.")


class ImageResult(BaseModel):
    """The generated images of one job."""

    model_config = ConfigDict(frozen=True)

    request_id: str = Field(description="Echoes the job's request id.")
    images: list[RawImage] = Field(description="Its images, in order, not yet encoded.")
    batch_images: int = Field(description="How many images shared the pipeline call.")
    inference_s: float = Field(description="Seconds the pipeline call took.")
    worker: str = Field("", description="The worker replica that ran it (for operators).")
    model_version: str = Field("", description="The version of the model that made them.")
    timings_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Milliseconds per stage of its way (``mediagate.protocol.timing``), "
        "filled in by the worker and the scheduler.",
    )
    first_step_wait_s: float | None = Field(
        None, description="Step-level workers: seconds from its arrival to its first step."
    )
    engine: StepEngineStats | None = Field(
        None, description="Step-level workers: their engine when this job finished."
    )
    service_s: float | None = Field(
        None,
        description="Step-level workers: its share of the time of the steps it ran in "
        "(a step of B images charges each 1/B): what it cost the replica, pauses excluded.",
    )


def pipeline_call_kwargs(jobs: list[ImageJob]) -> dict[str, Any]:
    """One diffusers call for a batch of same-shape jobs: prompts expanded per image."""
    first = jobs[0]
    prompts: list[str] = []
    negatives: list[str] = []
    for job in jobs:
        prompts.extend([job.prompt] * job.images)
        negatives.extend([job.negative_prompt or ""] * job.images)
    kwargs: dict[str, Any] = {
        "prompt": prompts,
        "width": first.width,
        "height": first.height,
        "num_inference_steps": first.num_inference_steps,
        "guidance_scale": first.guidance_scale,
        "num_images_per_prompt": 1,
    }
    if any(job.negative_prompt for job in jobs):
        kwargs["negative_prompt"] = negatives
    return kwargs


def image_seeds(jobs: list[ImageJob]) -> list[int]:
    """The seed of every image of a batch, in the order of ``pipeline_call_kwargs``."""
    return [job.seed + index for job in jobs for index in range(job.images)]


class VideoGeneration(BaseModel):
    """A video job's resolved pipeline arguments (diffusers names), kept with the job."""

    model_config = ConfigDict(frozen=True)

    prompt: str = Field(description="Prompt text.")
    negative_prompt: str | None = Field(None, description="Negative prompt text.")
    width: int = Field(description="Frame width in pixels.")
    height: int = Field(description="Frame height in pixels.")
    num_frames: int = Field(description="Frames to generate (seconds x fps, model-rounded).")
    fps: int = Field(description="Frames per second of the MP4.")
    num_inference_steps: int = Field(description="Denoising steps.")
    guidance_scale: float = Field(description="Classifier-free guidance.")
    seed: int = Field(description="Seed of the generator: same inputs, same video.")
    input_reference: str | None = Field(
        None, description="Artifact id of the conditioning image (image-to-video), if any."
    )
    moderation: Literal["auto", "low"] = Field(
        "auto", description="The level its frames are checked at (its tier's)."
    )
    tier: str = Field("", description="Its owner's tier when submitted (for metrics).")

    def pipeline_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "prompt": self.prompt,
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
        }
        if self.negative_prompt:
            kwargs["negative_prompt"] = self.negative_prompt
        return kwargs


class VideoTask(BaseModel):
    """What the scheduler hands a video worker: one dispatch (attempt) of one job."""

    model_config = ConfigDict(frozen=True)

    job_id: str = Field(description="The job.")
    account_id: str = Field(description="Its owner (addresses the job in the store).")
    attempt: int = Field(description="This dispatch's number; fences stale writes.")
    generation: VideoGeneration = Field(description="What to generate.")
    lease_s: float = Field(description="The worker renews the job's lease this often x3.")
    content_ttl_s: float = Field(description="How long the finished files stay downloadable.")
    priority_class: int = Field(
        0, ge=0, description="From its tier: a step-level worker pauses lower classes for it."
    )
    checkpoint: str | None = Field(
        None, description="Step-level workers: the checkpoint to resume from (an artifact id)."
    )


class VideoOutcome(BaseModel):
    """How a dispatch ended, as the worker saw it (the store holds the details)."""

    model_config = ConfigDict(frozen=True)

    job_id: str = Field(description="The job.")
    status: Literal["completed", "failed", "cancelled"] = Field(
        description="`cancelled`: the job was deleted or taken back while running."
    )
    inference_s: float = Field(0.0, description="Seconds in the pipeline.")
    steps_done: int = Field(0, description="Denoising steps run (by this dispatch).")
    resumed_at_step: int = Field(
        0, description="Step-level workers: the checkpoint's step this dispatch resumed at."
    )
    service_s: float | None = Field(
        None, description="Step-level workers: its steps' time, the time it sat paused not counted."
    )
