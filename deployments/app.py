"""The one place where plain deployment classes become a Ray Serve application.

Serve configs point at ``deployments.app:build_app`` with typed arguments
(``AppArgs``). Deployment names are stable (``Router``, ``Scheduler-<model>``,
``TextToImage-<model>``) so a Serve config can override any of their options,
and ``serve deploy`` of a changed config is a lightweight update.
"""

from __future__ import annotations

from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from autoscaling.naming import (
    LOOK_BACK_PERIOD_S,
    METRICS_INTERVAL_S,
    ROUTER,
    WEBHOOKS,
    scheduler_name,
    worker_autoscaling_config,
    worker_name,
)
from deployments.router.deployment import Router
from deployments.router.settings import RouterSettings
from deployments.scheduler.images import Scheduler
from deployments.scheduler.settings import VideoSchedulerSettings
from deployments.scheduler.videos import VideoScheduler
from deployments.webhooks.deployment import Webhooks
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
from mediagate.webhooks.settings import WebhookSettings
from models.catalog import load_catalog

WORKER_CLASSES: dict[str, type] = {"text-to-image": TextToImage, "text-to-video": TextToVideo}


class AppArgs(BaseModel):
    """Arguments of the mediagate application (the Serve config's ``args``)."""

    model_config = ConfigDict(extra="forbid")

    home: str | None = Field(None, description="MEDIAGATE_HOME; the environment's if unset.")
    catalog: str | None = Field(None, description="Catalog file; the shipped one if unset.")
    models: list[str] | None = Field(None, description="Model ids to serve; all if unset.")
    router: RouterSettings = Field(default_factory=RouterSettings)
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
    webhooks: WebhookSettings | None = Field(
        None,
        description="Webhook delivery; allowed_networks from MEDIAGATE_WEBHOOK_ALLOWED_NETWORKS "
        "when unset.",
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
    router_replicas: int = Field(1, ge=1, description="Router replicas (stateless).")
    worker_ray_actor_options: dict[str, Any] | None = Field(
        None,
        description="Replaces every worker's ray_actor_options (e.g. num_gpus: 0 on a CPU box); "
        "per-deployment overrides in the Serve config take precedence over both.",
    )


def worker_actor_options(spec: ModelSpec) -> dict[str, Any]:
    """What one replica of ``spec`` asks Ray for on a real cluster."""
    options: dict[str, Any] = {"num_cpus": 1, "num_gpus": spec.num_gpus}
    if spec.accelerator_type and spec.num_gpus:
        options["accelerator_type"] = spec.accelerator_type
    return options


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


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """Router -> one (Video)Scheduler per model -> that model's worker replicas."""
    app_args = AppArgs.model_validate(args)
    settings = get_settings()
    home = app_args.home or str(settings.home_dir)
    layout = HomeLayout(home)
    state = app_args.state or state_config(settings, layout)
    artifacts = app_args.artifacts or artifact_config(settings, layout)
    catalog = load_catalog(app_args.catalog)
    wanted = app_args.models or [spec.id for spec in catalog.models.values()]
    unknown = sorted(set(wanted) - set(catalog.models))
    if unknown:
        raise ValueError(f"models not in the catalog: {', '.join(unknown)}")

    tiers_file = app_args.tiers_file or (str(settings.tiers_file) if settings.tiers_file else None)
    tiers = load_tier_policy(tiers_file)
    provenance = signing_settings(app_args.provenance, layout)
    schedulers = {}
    for model_id in wanted:
        spec = catalog.models[model_id]
        if spec.task not in WORKER_CLASSES:
            continue  # served once its worker exists
        is_video = spec.task == "text-to-video"
        worker_deployment = worker_name(spec.task, spec.id)
        worker_kwargs: dict[str, Any] = {"cache_dir": str(layout.model_cache)}
        if is_video:
            worker_kwargs |= {
                "state": state,
                "artifacts": artifacts,
                "provenance": provenance,
                "moderation": app_args.moderation,
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
                ray_actor_options=app_args.worker_ray_actor_options or worker_actor_options(spec),
                health_check_period_s=10,
                health_check_timeout_s=60,
            )
            .bind(spec, **worker_kwargs)
        )
        scheduler_options: dict[str, Any] = {
            "name": scheduler_name(model_id),
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
        }
        if is_video:
            schedulers[model_id] = (
                _deployment(VideoScheduler)
                .options(**scheduler_options, user_config={})
                .bind(
                    worker,
                    spec,
                    state=state,
                    settings=video_scheduler_settings(spec, tiers, app_args.video),
                    worker_deployment=worker_deployment,
                )
            )
        else:
            schedulers[model_id] = (
                _deployment(Scheduler)
                .options(**scheduler_options, user_config=image_scheduler_user_config(spec))
                .bind(
                    worker,
                    spec,
                    worker_deployment=worker_deployment,
                    slots_per_replica=seats,
                    base_config=step_level_scheduler_config(spec, tiers),
                )
            )

    webhook_settings = app_args.webhooks or WebhookSettings(
        allowed_networks=settings.webhook_networks
    )
    webhooks = (
        _deployment(Webhooks)
        .options(
            name=WEBHOOKS,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            health_check_period_s=2,  # the health check also (re)starts the sender
        )
        .bind(state=state, settings=webhook_settings)  # switched off, it drops the events
    )
    router = _deployment(serve.ingress()(Router)).options(
        name=ROUTER,
        num_replicas=app_args.router_replicas,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0},
        user_config={"tiers_file": tiers_file},
    )
    return router.bind(
        schedulers,
        home=home,
        state=state,
        artifacts=artifacts,
        catalog=app_args.catalog,
        settings=app_args.router,
        tiers_file=tiers_file,
        webhooks=webhooks,
        webhook_settings=webhook_settings,
        provenance=provenance,
        moderation=app_args.moderation,
    )
