"""The one place where plain deployment classes become a Ray Serve application.

Serve configs point at ``deployments.app:build_app`` with typed arguments
(``AppArgs``). Deployment names are stable (``Router``, ``Scheduler-<model>``,
``TextToImage-<model>``) so a Serve config can override any of their options,
and ``serve deploy`` of a changed config is a lightweight update.
"""

from __future__ import annotations

from typing import Any, cast

from pydantic import Field
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from autoscaling.naming import ROUTER, WEBHOOKS
from deployments.model_app import WORKER_CLASSES, ServiceArgs, Shared, model_scheduler
from deployments.router.deployment import Router
from deployments.router.settings import RouterSettings
from deployments.webhooks.deployment import Webhooks
from mediagate.settings import get_settings
from mediagate.webhooks.settings import WebhookSettings
from models.catalog import load_catalog


class AppArgs(ServiceArgs):
    """Arguments of the mediagate application (the Serve config's ``args``): the
    router, the webhook sender and the models of ``models`` (a cluster deployed from a
    config serves its models as applications of their own: ``deployments.model_app``)."""

    models: list[str] | None = Field(
        None, description="Catalog model ids served in this application; all if unset."
    )
    router: RouterSettings = Field(default_factory=RouterSettings)
    webhooks: WebhookSettings | None = Field(
        None,
        description="Webhook delivery; allowed_networks from MEDIAGATE_WEBHOOK_ALLOWED_NETWORKS "
        "when unset.",
    )
    router_replicas: int = Field(1, ge=1, description="Router replicas (stateless).")


def _deployment(cls: type) -> Deployment:
    return cast(Deployment, serve.deployment(cls))


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """Router -> one (Video)Scheduler per model of ``args.models`` -> that model's worker
    replicas; and the webhook sender."""
    app_args = AppArgs.model_validate(args)
    shared = Shared.of(app_args)
    catalog = load_catalog(app_args.catalog)
    wanted = (
        app_args.models
        if app_args.models is not None
        else [spec.id for spec in catalog.models.values()]
    )
    unknown = sorted(set(wanted) - set(catalog.models))
    if unknown:
        raise ValueError(f"models not in the catalog: {', '.join(unknown)}")
    schedulers = {
        model_id: model_scheduler(catalog.models[model_id], shared)
        for model_id in wanted
        if catalog.models[model_id].task in WORKER_CLASSES  # others: once a worker exists
    }
    webhook_settings = app_args.webhooks or WebhookSettings(
        allowed_networks=get_settings().webhook_networks
    )
    webhooks = (
        _deployment(Webhooks)
        .options(
            name=WEBHOOKS,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            health_check_period_s=2,  # the health check also (re)starts the sender
        )
        .bind(state=shared.state, settings=webhook_settings)  # switched off, it drops the events
    )
    router = _deployment(serve.ingress()(Router)).options(
        name=ROUTER,
        num_replicas=app_args.router_replicas,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0},
        # A stopping router lets its requests (queued up to a tier's wait, then made)
        # finish for a minute; Serve's default is 20 s (the direct-ingress drain floor
        # raised it to 35 s before mediagate shortened that drain to 5 s).
        graceful_shutdown_timeout_s=60,
        user_config={"tiers_file": shared.tiers_file},
    )
    return router.bind(
        schedulers,
        home=str(shared.layout.root),
        state=shared.state,
        artifacts=shared.artifacts,
        catalog=app_args.catalog,
        settings=app_args.router,
        tiers_file=shared.tiers_file,
        webhooks=webhooks,
        webhook_settings=webhook_settings,
        provenance=shared.provenance,
        moderation=app_args.moderation,
    )
