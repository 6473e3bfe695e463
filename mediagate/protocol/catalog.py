"""The model catalog's entries: frozen `ModelSpec` objects (task, source, pipeline, GPUs,
defaults, caps, batching, scaling).

Adding or swapping a model is one entry in the catalog file, never code
(`models/catalog.py` reads the file).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Task = Literal["text-to-image", "text-to-video"]
# What a model serves from its one set of weights: its task, and what diffusers builds
# from the same components (image-to-image and inpaint for an image model).
ServedTask = Literal[
    "text-to-image", "image-to-image", "inpaint", "text-to-video", "image-to-video"
]
EDIT_TASKS: tuple[ServedTask, ...] = ("image-to-image", "inpaint")
Level = Literal["low", "medium", "high"]
LEVELS: tuple[Level, ...] = ("low", "medium", "high")  # the qualities an answer can name


SOURCE_SCHEMES = ("tiny://", "simulated://", "hf://", "s3://", "file://")


MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def parse_size(size: str) -> tuple[int, int]:
    """``"640x480"`` -> ``(640, 480)`` (width, height); raises ``ValueError`` otherwise."""
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"size must look like WIDTHxHEIGHT (for example 512x512), got {size!r}")
    return int(match.group(1)), int(match.group(2))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerationDefaults(_Frozen):
    """What a request gets for every field it leaves out."""

    size: str = Field("512x512", description="Default output size, WIDTHxHEIGHT.")
    num_inference_steps: int = Field(25, ge=1, description="Default denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, description="Default classifier-free guidance.")

    @field_validator("size")
    @classmethod
    def _size_parses(cls, value: str) -> str:
        parse_size(value)
        return value


class GenerationCaps(_Frozen):
    """Hard limits a request may not exceed for this model."""

    max_width: int = Field(1024, ge=8, description="Largest width in pixels.")
    max_height: int = Field(1024, ge=8, description="Largest height in pixels.")
    min_side: int = Field(8, ge=1, description="Smallest width or height in pixels.")
    size_multiple: int = Field(8, ge=1, description="Width and height must be multiples of this.")
    max_steps: int = Field(50, ge=1, description="Most denoising steps a request may ask for.")
    max_n: int = Field(4, ge=1, le=10, description="Most images one request may ask for.")

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The size nearest ``width`` x ``height`` that these caps allow, keeping the
        aspect ratio: scaled down into the largest sides (never up, except to the
        smallest side), each side rounded to the size multiple (an edit's ``size: auto``)."""
        scale = min(1.0, self.max_width / width, self.max_height / height)

        def side(pixels: float, largest: int) -> int:
            snapped = int(pixels / self.size_multiple + 0.5) * self.size_multiple  # half up
            floor_ = -(-self.min_side // self.size_multiple) * self.size_multiple
            return max(floor_, min(snapped, largest - largest % self.size_multiple))

        return side(width * scale, self.max_width), side(height * scale, self.max_height)


class Batching(_Frozen):
    """How the scheduler groups queued requests of the same shape into one pipeline call."""

    max_batch_size: int = Field(4, ge=1, description="Most images in one pipeline call.")
    batch_wait_s: float = Field(
        0.0, ge=0, le=5, description="How long to hold a partial batch hoping for more work."
    )


class StepLevel(_Frozen):
    """Step-level serving (issue 17): the worker owns the denoising loop; requests take
    seats, join the running batch at a step boundary, and a higher class pauses a lower
    one (``deployments/workers/step_engine.py``). ``batching.max_batch_size`` is the
    most images in one step."""

    seats_per_replica: int = Field(
        8, ge=1, description="Requests one replica holds at once, running or paused."
    )
    lower_class_seat_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of the seats classes below the top one may fill: the rest wait "
        "for higher-class work, which then pauses them at a step instead of queueing.",
    )
    max_pauses: int = Field(
        50,
        ge=1,
        description="Steps in a row a started request may sit out; then it outranks "
        "every class for one step (nothing starves).",
    )
    max_idle_device_mb: float | None = Field(
        None,
        gt=0,
        description="Device memory the tensors of requests that sit out a step (paused, "
        "or not started) may hold in all; beyond it the last to run again wait in host "
        "memory. None: they all stay on the device.",
    )
    checkpoint_every_steps: int = Field(
        10,
        ge=1,
        description="Video models: a running job's state is written to the artifact store "
        "every this many steps; when its worker is lost, the next resumes from there.",
    )

    @property
    def max_idle_device_bytes(self) -> int | None:
        mb = self.max_idle_device_mb
        return None if mb is None else int(mb * 2**20)


class Scaling(_Frozen):
    """How many replicas of the model's worker the autoscaler may run, and how fast it
    follows the queue (``autoscaling/policy.py``). The Serve config can override any of
    these per deployment (``autoscaling_config``), live."""

    min_replicas: int = Field(1, ge=0, description="Never fewer (0 only for video models).")
    max_replicas: int = Field(1, ge=1, description="Never more.")
    target_per_replica: float = Field(
        1.0, gt=0, description="Requests (weighted queued + running) one replica should carry."
    )
    upscale_delay_s: float = Field(1.0, ge=0, description="Demand must last this long to add.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Idle this long to remove one.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Idle this long to go from 1 to 0 (default: downscale_delay_s)."
    )
    drain_s: float | None = Field(
        None,
        ge=0,
        description=(
            "A replica the autoscaler removes takes no new work and finishes what it runs for "
            "up to this long (Serve's graceful_shutdown_timeout_s); work still running then is "
            "lost and runs again elsewhere. Default: 60 s for image models, 1800 s for video."
        ),
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("scaling.min_replicas must not exceed scaling.max_replicas")
        return self


class VideoSettings(_Frozen):
    """Timing of a video model: the API's ``seconds`` times ``fps`` gives the frame count."""

    fps: int = Field(16, ge=1, le=60, description="Frames per second of the encoded MP4.")
    allowed_seconds: list[int] = Field(
        default_factory=lambda: [4, 8, 12], description="Values the API's `seconds` may take."
    )
    default_seconds: int = Field(4, ge=1, description="`seconds` when a request leaves it out.")
    frame_multiple: int = Field(
        4, ge=1, description="Frame counts are k * frame_multiple + 1 (the VAE's time stride)."
    )
    max_frames: int = Field(129, ge=1, description="Most frames one job may generate.")
    image_to_video_pipeline_class: str | None = Field(
        None,
        description="diffusers pipeline class built from the same components (``from_pipe``) "
        "for `input_reference`; unset means the model takes no image.",
    )

    @model_validator(mode="after")
    def _default_allowed(self) -> VideoSettings:
        if self.default_seconds not in self.allowed_seconds:
            raise ValueError("video.default_seconds must be one of video.allowed_seconds")
        return self

    def num_frames(self, seconds: int) -> int:
        """Frames for a clip of ``seconds``: the nearest count the model accepts, at least 1."""
        multiple = self.frame_multiple
        return max(0, round(seconds * self.fps / multiple)) * multiple + 1


class ModelSpec(_Frozen):
    """One catalog entry: everything needed to load, place and bound a model."""

    id: str = Field(pattern=MODEL_ID_PATTERN, description="Public model id (the API's `model`).")
    task: Task = Field(description="What the model generates.")
    source: str = Field(
        description="tiny://NAME, simulated://NAME?step_ms=N, hf://ORG/NAME, s3://BUCKET/PREFIX, "
        "or a local directory (absolute, or relative to the catalog file)."
    )
    pipeline_class: str = Field(
        "DiffusionPipeline", description="diffusers pipeline class used by from_pretrained."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights dtype on a GPU; CPUs always use float32."
    )
    num_gpus: float = Field(1, ge=0, description="GPUs one replica needs on a real cluster.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. A10G.")
    host_memory: bool = Field(
        False,
        description="Keep the loaded pipeline in its node's host memory (Ray's object store) "
        "for the next replica there, which then skips loading from files; costs host memory "
        "the size of the weights on each node the model has run on.",
    )
    owned_by: str = Field("mediagate", description="Shown as `owned_by` in /v1/models.")
    version: str = Field(
        "1",
        pattern=r"^[A-Za-z0-9._-]{1,32}$",
        description="Which weights serve this id: `mediagate models swap` makes the next "
        "one; every image and video job names the version that made it.",
    )
    description: str = Field("", description="One line for humans.")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    caps: GenerationCaps = Field(default_factory=GenerationCaps)
    quality_steps: dict[str, int] = Field(
        default_factory=dict,
        description="OpenAI `quality` values this model accepts, mapped to denoising steps.",
    )
    batching: Batching = Field(default_factory=Batching)
    scaling: Scaling = Field(default_factory=Scaling)
    video: VideoSettings | None = Field(
        None, description="Required for text-to-video models: fps, seconds and frame rules."
    )
    pipeline_arguments: dict[str, int | float | str | bool] = Field(
        default_factory=dict,
        description="Fixed keyword arguments of every pipeline call, e.g. FLUX's "
        "`max_sequence_length` (passed only where the pipeline takes them).",
    )
    stepping: StepLevel | None = Field(
        None,
        description="Serve step by step (families with a stepper: Stable Diffusion, and "
        "simulated:// models); unset: one pipeline call per batch.",
    )
    edit_by: Literal["strength", "instruction"] = Field(
        "strength",
        description="How the model edits an image without a mask. `strength`: the input is "
        "noised and part of the schedule redrawn (diffusers' image-to-image pipeline built "
        "from the same components: SD, SDXL, FLUX img2img). `instruction`: the model's own "
        "pipeline takes the input as a condition and the prompt as an instruction (FLUX.1 "
        "Kontext, Qwen-Image-Edit); `strength` does not apply.",
    )
    tasks: list[ServedTask] = Field(
        default_factory=list,
        description="Everything the model serves: its `task`, and for an image model the "
        "edits (image-to-image, inpaint) built from the same loaded components (diffusers' "
        "AutoPipelineFor*.from_pipe). A video model serves image-to-video when "
        "`video.image_to_video_pipeline_class` is set. Empty means `task` alone.",
    )

    def ray_actor_options(self) -> dict[str, Any]:
        """What one worker replica of this model asks Ray for on a real cluster."""
        options: dict[str, Any] = {"num_cpus": 1, "num_gpus": self.num_gpus}
        if self.accelerator_type and self.num_gpus:
            options["accelerator_type"] = self.accelerator_type
        return options

    @field_validator("source")
    @classmethod
    def _source_known(cls, value: str) -> str:
        if "://" in value and not value.startswith(SOURCE_SCHEMES):
            schemes = ", ".join(SOURCE_SCHEMES)
            raise ValueError(f"source must start with one of {schemes} or be a path, got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _tasks_default(cls, values: Any) -> Any:
        """``tasks`` left out is ``task`` alone; image-to-video follows the video section's
        pipeline class (the one place that says it), whatever ``tasks`` lists."""
        if not isinstance(values, dict) or "task" not in values:
            return values
        video = values.get("video") or {}
        image_to_video = (
            video.image_to_video_pipeline_class
            if isinstance(video, VideoSettings)
            else video.get("image_to_video_pipeline_class")
        )
        tasks = [
            task for task in values.get("tasks") or [values["task"]] if task != "image-to-video"
        ]
        return {**values, "tasks": tasks + (["image-to-video"] if image_to_video else [])}

    @model_validator(mode="after")
    def _tasks_fit(self) -> ModelSpec:
        edits = [task for task in self.tasks if task in EDIT_TASKS]
        if self.task not in self.tasks and not (self.edit_by == "instruction" and edits):
            raise ValueError(
                f"tasks must include the model's task ({self.task}), unless it is an "
                "instruction-edit model that only edits (e.g. Qwen-Image-Edit)"
            )
        if edits and self.task != "text-to-image":
            raise ValueError(f"{', '.join(edits)} can be served by text-to-image models only")
        if self.edit_by == "instruction" and "image-to-image" not in self.tasks:
            raise ValueError("an instruction-edit model must list image-to-image in its tasks")
        return self

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> ModelSpec:
        width, height = parse_size(self.defaults.size)
        if width > self.caps.max_width or height > self.caps.max_height:
            raise ValueError(f"default size {self.defaults.size} exceeds the caps")
        if self.defaults.num_inference_steps > self.caps.max_steps:
            raise ValueError("default num_inference_steps exceeds caps.max_steps")
        if self.task == "text-to-image" and self.scaling.min_replicas < 1:
            raise ValueError(
                "scaling.min_replicas must be >= 1 for image models: an image request waits "
                "for its answer and cannot wait for a GPU replica to start"
            )
        if self.task == "text-to-video" and self.video is None:
            raise ValueError("a text-to-video model needs a `video` section (fps, seconds)")
        if self.video is not None:
            longest = self.video.num_frames(max(self.video.allowed_seconds))
            if longest > self.video.max_frames:
                raise ValueError(
                    f"video.allowed_seconds reach {longest} frames, over video.max_frames"
                )
        return self

    @property
    def default_size(self) -> tuple[int, int]:
        return parse_size(self.defaults.size)

    def quality_of(self, steps: int) -> Level:
        """What an answer says its quality was: the highest of the model's named
        qualities whose steps were run; without any, how ``steps`` compares to the
        default (OpenAI's answers say low, medium or high, never auto)."""
        steps_of = self.quality_steps
        named = {level: steps_of[level] for level in LEVELS if level in steps_of}
        if named:
            reached = [level for level, count in named.items() if count <= steps]
            return max(reached, key=named.__getitem__) if reached else "low"
        default = self.defaults.num_inference_steps
        return "low" if steps < default else "medium" if steps == default else "high"


class Catalog(_Frozen):
    """All models the service knows, and the default model per task."""

    models: dict[str, ModelSpec]
    default_models: dict[Task, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _defaults_exist(self) -> Catalog:
        for task, model_id in self.default_models.items():
            spec = self.models.get(model_id)
            if spec is None:
                raise ValueError(f"default model {model_id!r} for {task} is not in the catalog")
            if spec.task != task or task not in spec.tasks:
                raise ValueError(f"default model {model_id!r} does not serve {task}")
        return self

    def get(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)

    def default_for(self, task: Task) -> ModelSpec | None:
        model_id = self.default_models.get(task)
        if model_id is None:
            candidates = [spec for spec in self.models.values() if task in spec.tasks]
            return candidates[0] if candidates else None
        return self.models[model_id]

    def for_task(self, task: Task) -> list[ModelSpec]:
        return [spec for spec in self.models.values() if spec.task == task]


class LiveModel(_Frozen):
    """A model served as a Serve application of its own, as the router's ``user_config``
    names it (``live_models``: model id -> this); ``mediagate models`` writes it."""

    app: str = Field(min_length=1, description="The Serve application holding its scheduler.")
    spec: ModelSpec = Field(description="Its catalog entry, version included.")
    accepting: bool = Field(
        True,
        description="False while it is being removed: requests for it are refused (404).",
    )
