"""One model's deployments (its scheduler and its worker replicas), and the Serve
application that holds just them.

Models are their own applications in a config-deployed cluster: Serve restarts every
replica of an application whose arguments change (the code version hashes them), so a
model added, swapped or removed as an application of its own leaves every other
model's replicas, queues and running work alone. The router finds such a model by the
application named in its ``user_config`` (``live_models``), a lightweight update.
``deployments.app:build_app`` still builds the models of its own ``args.models`` into
the router's application (one application to ``serve.run`` in tests and benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from autoscaling.naming import (
    LOOK_BACK_PERIOD_S,
    METRICS_INTERVAL_S,
    scheduler_name,
    worker_autoscaling_config,
    worker_drain_s,
    worker_name,
)
from deployments.scheduler.images import Scheduler
from deployments.scheduler.settings import VideoSchedulerSettings
from deployments.scheduler.videos import VideoScheduler
from deployments.workers.step_level import StepLevelTextToImage
from deployments.workers.text_to_image import TextToImage
from deployments.workers.text_to_video import TextToVideo
from mediagate.access.tiers import TierPolicy, load_tier_policy
from mediagate.moderation.settings import ModerationSettings
from mediagate.protocol.catalog import ModelSpec
from mediagate.provenance.certificates import ensure_local_certificate
from mediagate.provenance.settings import ProvenanceSettings
from mediagate.settings import HomeLayout, artifact_config, get_settings, state_config
from mediagate.stores import StateConfig
from mediagate.stores.artifacts import ArtifactConfig
from models.catalog import load_catalog

WORKER_CLASSES: dict[str, type] = {"text-to-image": TextToImage, "text-to-video": TextToVideo}


class ServiceArgs(BaseModel):
    """What the router's application and every model application share: where state,
    files and the tier policy live, and how outputs are checked and signed. A model
    application must be given the same values as the router's (``mediagate models add``
    copies them from the deployed router application)."""

    model_config = ConfigDict(extra="forbid")

    home: str | None = Field(None, description="MEDIAGATE_HOME; the environment's if unset.")
    catalog: str | None = Field(None, description="Catalog file; the shipped one if unset.")
    video: VideoSchedulerSettings = Field(
        default_factory=VideoSchedulerSettings,
        description="Video jobs: leases, attempts, content lifetime; declared here only "
        "(a video scheduler's user_config may override single keys live).",
    )
    state: StateConfig | None = Field(
        None, description="State store; from MEDIAGATE_REDIS_URL, else SQLite under home."
    )
    tiers_file: str | None = Field(
        None,
        description="Tier policy YAML (MEDIAGATE_TIERS_FILE, else the shipped one). Changing "
        "the Router's user_config (tiers_file, or tiers inline) reloads it live.",
    )
    artifacts: ArtifactConfig | None = Field(
        None, description="Artifact store; from MEDIAGATE_S3_BUCKET, else files under home."
    )
    provenance: ProvenanceSettings = Field(
        default_factory=ProvenanceSettings,
        description="C2PA signing of outputs; without a certificate and key of the "
        "operator's, a local test certificate (untrusted) under home.",
    )
    moderation: ModerationSettings = Field(
        default_factory=ModerationSettings,
        description="Prompt, upload and output checks; the tier file says each tier's level.",
    )
    worker_ray_actor_options: dict[str, Any] | None = Field(
        None,
        description="Replaces every worker's ray_actor_options (e.g. num_gpus: 0 on a CPU box); "
        "per-deployment overrides in the Serve config take precedence over both.",
    )


class ModelAppArgs(ServiceArgs):
    """Arguments of one model's application: the model, by catalog id or whole."""

    model: str | None = Field(None, description="A model id of the catalog file.")
    spec: ModelSpec | None = Field(
        None, description="The whole catalog entry (what `mediagate models add` writes)."
    )

    @model_validator(mode="after")
    def _one_model(self) -> ModelAppArgs:
        if (self.model is None) == (self.spec is None):
            raise ValueError("give the model as `model` (a catalog id) or as `spec`, not both")
        return self

    def model_spec(self) -> ModelSpec:
        if self.spec is not None:
            return self.spec
        catalog = load_catalog(self.catalog)
        if self.model not in catalog.models:
            raise ValueError(f"model {self.model!r} is not in the catalog")
        return catalog.models[self.model]


@dataclass(frozen=True)
class Shared:
    """``ServiceArgs`` resolved against the environment, once per application build."""

    layout: HomeLayout
    state: StateConfig
    artifacts: ArtifactConfig
    tiers_file: str | None
    tiers: TierPolicy
    provenance: ProvenanceSettings
    moderation: ModerationSettings
    video: VideoSchedulerSettings
    worker_ray_actor_options: dict[str, Any] | None

    @classmethod
    def of(cls, args: ServiceArgs) -> Shared:
        settings = get_settings()
        layout = HomeLayout(args.home or str(settings.home_dir))
        tiers_file = args.tiers_file or (str(settings.tiers_file) if settings.tiers_file else None)
        return cls(
            layout=layout,
            state=args.state or state_config(settings, layout),
            artifacts=args.artifacts or artifact_config(settings, layout),
            tiers_file=tiers_file,
            tiers=load_tier_policy(tiers_file),
            provenance=signing_settings(args.provenance, layout),
            moderation=args.moderation,
            video=args.video,
            worker_ray_actor_options=args.worker_ray_actor_options,
        )


def image_scheduler_user_config(spec: ModelSpec) -> dict[str, Any]:
    """The user_config an image scheduler starts with (a step-level one: nothing over its
    base config, whose batching is one job per call)."""
    return {} if spec.stepping is not None else {"batching": spec.batching.model_dump()}


def step_level_scheduler_config(spec: ModelSpec, tiers: TierPolicy) -> dict[str, Any] | None:
    """What a step-level model's scheduler runs with under any live user_config: one
    job per call (each takes a seat and joins at a step), no preemption (the worker
    pauses lower classes at a step instead), seats kept free for the top class."""
    if spec.stepping is None:
        return None
    top = max(tier.priority_class for tier in tiers.tiers.values())
    lower = {tier.priority_class for tier in tiers.tiers.values()} - {top}
    return {
        "batching": {"max_batch_size": 1, "batch_wait_s": 0.0},
        "preemption": {"enabled": False},
        "slots_per_replica": spec.stepping.seats_per_replica,
        "seat_shares": dict.fromkeys(sorted(lower), spec.stepping.lower_class_seat_share),
    }


def video_scheduler_settings(
    spec: ModelSpec, tiers: TierPolicy, declared: VideoSchedulerSettings
) -> VideoSchedulerSettings:
    """A video model's scheduler settings: the application's, and for a step-level model
    one job per seat with seats kept free for the top class (its worker pauses lower
    classes at a step for it)."""
    stepped = step_level_scheduler_config(spec, tiers)
    if stepped is None:
        return declared
    return declared.model_copy(
        update={key: stepped[key] for key in ("slots_per_replica", "seat_shares")}
    )


def signing_settings(declared: ProvenanceSettings, layout: HomeLayout) -> ProvenanceSettings:
    """The provenance settings every process signs with: the operator's certificate and
    key, or (neither given) the local test certificate, made once under home."""
    if not declared.enabled or (declared.certificate_chain and declared.private_key):
        return declared
    if declared.certificate_chain or declared.private_key:
        raise ValueError("provenance needs both certificate_chain and private_key, or neither")
    files = ensure_local_certificate(layout.secrets)
    return declared.model_copy(
        update={"certificate_chain": str(files.chain), "private_key": str(files.key)}
    )


def _deployment(cls: type) -> Deployment:
    return cast(Deployment, serve.deployment(cls))


def model_scheduler(spec: ModelSpec, shared: Shared) -> Application:
    """``spec``'s scheduler bound to its worker deployment: one model, ready to be a
    node of the router's application or an application of its own."""
    if spec.task not in WORKER_CLASSES:
        raise ValueError(f"no worker serves {spec.task} models")
    is_video = spec.task == "text-to-video"
    worker_deployment = worker_name(spec.task, spec.id)
    worker_kwargs: dict[str, Any] = {"cache_dir": str(shared.layout.model_cache)}
    if is_video:
        worker_kwargs |= {
            "state": shared.state,
            "artifacts": shared.artifacts,
            "provenance": shared.provenance,
            "moderation": shared.moderation,
        }
    worker_class = WORKER_CLASSES[spec.task]
    seats = 1  # one batch at a time: waiting happens in the scheduler
    if spec.stepping is not None:  # the worker holds seats (a video one: its loop)
        seats = spec.stepping.seats_per_replica
        if spec.task == "text-to-image":
            worker_class = StepLevelTextToImage
    worker = (
        _deployment(worker_class)
        .options(
            name=worker_deployment,
            num_replicas=None,
            # Sized by autoscaling/policy.py from the scheduler's queue (when the
            # application declares it), within these limits.
            autoscaling_config=worker_autoscaling_config(spec.scaling),
            max_ongoing_requests=seats,
            ray_actor_options=shared.worker_ray_actor_options or spec.ray_actor_options(),
            health_check_period_s=10,
            health_check_timeout_s=60,
            # A replica the autoscaler removes is drained: no new work, its running
            # batches or video runs finish (up to the model's drain_s).
            graceful_shutdown_timeout_s=worker_drain_s(spec.scaling, spec.task),
            graceful_shutdown_wait_loop_s=1,
        )
        .bind(spec, **worker_kwargs)
    )
    scheduler_options: dict[str, Any] = {
        "name": scheduler_name(spec.id),
        "num_replicas": None,
        # Exactly one: the scheduler owns its model's queue. An autoscaling
        # config (min = max = 1) makes Serve collect its queue metrics.
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 1,
            "metrics_interval_s": METRICS_INTERVAL_S,
            "look_back_period_s": LOOK_BACK_PERIOD_S,
        },
        "max_ongoing_requests": 100_000,
        "ray_actor_options": {"num_cpus": 0},
        # Deleted (a model version removed) only once drained: what a router still
        # holds open on it then is not work, and need not be waited for 20 s.
        "graceful_shutdown_timeout_s": 5,
        "graceful_shutdown_wait_loop_s": 1,
    }
    if is_video:
        return (
            _deployment(VideoScheduler)
            .options(**scheduler_options, user_config={})
            .bind(
                worker,
                spec,
                state=shared.state,
                settings=video_scheduler_settings(spec, shared.tiers, shared.video),
                worker_deployment=worker_deployment,
            )
        )
    return (
        _deployment(Scheduler)
        .options(**scheduler_options, user_config=image_scheduler_user_config(spec))
        .bind(
            worker,
            spec,
            worker_deployment=worker_deployment,
            slots_per_replica=seats,
            base_config=step_level_scheduler_config(spec, shared.tiers),
        )
    )


def build_model_app(args: dict[str, Any] | ModelAppArgs) -> Application:
    """One model as a Serve application: its scheduler (the ingress, reached by handle,
    no HTTP route) and its worker replicas."""
    app_args = ModelAppArgs.model_validate(args)
    return model_scheduler(app_args.model_spec(), Shared.of(app_args))
