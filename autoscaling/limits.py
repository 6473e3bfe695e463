"""Autoscaling limits changed live, for SREs: pure config in, config out.

``mediagate scale set`` (``mediagate.cli.scale``) and the console's operator endpoint
(``POST /v1/ops/limits``) both read the Serve config that is deployed and deploy it again
with only the autoscaling numbers (and the free tier's queue weight) changed, checked
here the same way for both. Serve applies such a change as a lightweight update: no
replica restarts (see RAY_SERVE_NOTES.md). The callers do the I/O and the audit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from autoscaling.naming import (
    ROUTER,
    WORKER_PREFIXES,
    is_image_worker,
    scheduler_name,
    worker_model,
)
from autoscaling.policy import DEFAULT_QUEUE_WEIGHTS
from mediagate.protocol.ops import MAX_REPLICAS_LIMIT

# The numbers of an autoscaling_config that may be carried into the config file. The
# deployed config also shows Serve's policy entry: writing that back would count as
# adding a policy, which changes the code version and restarts the replicas.
AUTOSCALING_NUMBERS = (
    "min_replicas",
    "max_replicas",
    "initial_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "downscale_to_zero_delay_s",
    "metrics_interval_s",
    "look_back_period_s",
    "upscaling_factor",
    "downscaling_factor",
)


class ScaleError(ValueError):
    """A scale change that cannot be applied; nothing was changed."""


@dataclass(frozen=True)
class ScaleChange:
    model: str
    min_replicas: int | None = None
    max_replicas: int | None = None
    target: float | None = None
    free_weight: float | None = None
    allow_zero_images: bool = False

    def is_empty(self) -> bool:
        return all(
            value is None
            for value in (self.min_replicas, self.max_replicas, self.target, self.free_weight)
        )


def _deployments(app: dict[str, Any]) -> list[dict[str, Any]]:
    return app.setdefault("deployments", [])


def _entry(app: dict[str, Any], name: str) -> dict[str, Any]:
    """The app's config entry for deployment ``name`` (added when missing)."""
    for entry in _deployments(app):
        if entry.get("name") == name:
            return entry
    entry = {"name": name}
    _deployments(app).append(entry)
    return entry


def worker_deployment(model: str, deployed: dict[str, Any]) -> str:
    """The worker deployment of ``model`` among ``deployed`` (name -> deployment details)."""
    for prefix in WORKER_PREFIXES:
        if f"{prefix}{model}" in deployed:
            return f"{prefix}{model}"
    models = sorted(
        name.removeprefix(prefix)
        for name in deployed
        for prefix in WORKER_PREFIXES
        if name.startswith(prefix)
    )
    raise ScaleError(f"no model {model!r} is deployed; models: {', '.join(models) or 'none'}")


def apply_scale_change(
    config: dict[str, Any],
    app_name: str,
    change: ScaleChange,
    *,
    current_limits: dict[str, Any],
    worker: str,
    free_class: int = 0,
) -> tuple[dict[str, Any], list[str]]:
    """Return the config with ``change`` applied, and one line per value that changed.

    ``current_limits`` is the worker's deployed ``autoscaling_config`` (the baseline
    for the checks: a new max below the deployed min is refused, and so on).
    """
    if change.is_empty():
        raise ScaleError("nothing to change: give --min, --max, --target or --free-weight")
    new = copy.deepcopy(config)
    apps = [app for app in new.get("applications", []) if app.get("name") == app_name]
    if not apps:
        raise ScaleError(f"application {app_name!r} is not in the deployed config")
    app = apps[0]
    limits = {
        "min_replicas": current_limits.get("min_replicas", 1),
        "max_replicas": current_limits.get("max_replicas", 1),
        "target_ongoing_requests": current_limits.get("target_ongoing_requests", 1.0),
    }
    wanted = dict(limits)
    if change.min_replicas is not None:
        wanted["min_replicas"] = change.min_replicas
    if change.max_replicas is not None:
        wanted["max_replicas"] = change.max_replicas
    if change.target is not None:
        wanted["target_ongoing_requests"] = change.target
    _check_limits(wanted, worker=worker, allow_zero_images=change.allow_zero_images)

    lines: list[str] = []
    worker_entry = _entry(app, worker)
    numbers = {
        k: v for k, v in current_limits.items() if k in AUTOSCALING_NUMBERS and v is not None
    }
    autoscaling = {**numbers, **(worker_entry.get("autoscaling_config") or {})}
    for key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
        if wanted[key] != limits[key]:
            lines.append(f"{worker}.autoscaling_config.{key}: {limits[key]} -> {wanted[key]}")
        autoscaling[key] = wanted[key]
    if autoscaling.get("initial_replicas") is not None:  # must stay within the new bounds
        autoscaling["initial_replicas"] = min(
            max(autoscaling["initial_replicas"], wanted["min_replicas"]), wanted["max_replicas"]
        )
    worker_entry["autoscaling_config"] = autoscaling
    worker_entry.pop("num_replicas", None)  # autoscaled: Serve refuses both

    if change.free_weight is not None:
        if not (0.0 <= change.free_weight <= 10.0) or math.isnan(change.free_weight):
            raise ScaleError("--free-weight must be between 0 and 10")
        model = worker.split("-", 1)[1]
        scheduler = _entry(app, scheduler_name(model))
        user_config = dict(scheduler.get("user_config") or {})
        weights = {str(k): float(v) for k, v in (user_config.get("queue_weights") or {}).items()}
        before = weights.get(str(free_class), DEFAULT_QUEUE_WEIGHTS.get(free_class, 1.0))
        weights[str(free_class)] = change.free_weight
        user_config["queue_weights"] = weights
        scheduler["user_config"] = user_config
        if before != change.free_weight:
            lines.append(
                f"{scheduler_name(model)}.user_config.queue_weights.{free_class}: "
                f"{before} -> {change.free_weight}"
            )
    return new, lines


def _check_limits(limits: dict[str, Any], *, worker: str, allow_zero_images: bool) -> None:
    low, high, target = (
        limits["min_replicas"],
        limits["max_replicas"],
        limits["target_ongoing_requests"],
    )
    if low < 0:
        raise ScaleError("--min must be >= 0")
    if high < 1 or high > MAX_REPLICAS_LIMIT:
        raise ScaleError(f"--max must be between 1 and {MAX_REPLICAS_LIMIT}")
    if low > high:
        raise ScaleError(f"min ({low}) must not exceed max ({high})")
    if not (0 < target <= 1000) or math.isnan(target):
        raise ScaleError("--target must be > 0 and <= 1000 (requests per replica)")
    if low == 0 and is_image_worker(worker) and not allow_zero_images:
        raise ScaleError(
            "image models keep at least one replica: an image request waits for its answer "
            "and cannot wait for a GPU replica to start (use --allow-zero to insist)"
        )


def live_routes(router_app_config: dict[str, Any]) -> dict[str, Any]:
    """The router's routes to models served as applications of their own: its config
    entry's ``user_config.live_models`` (written by ``mediagate models``), as data."""
    for entry in router_app_config.get("deployments") or []:
        if entry.get("name") == ROUTER:
            return dict((entry.get("user_config") or {}).get("live_models") or {})
    return {}


def live_model_apps(details: dict[str, Any], app_name: str) -> dict[str, str]:
    """The models ``app_name``'s router serves from applications of their own: model ->
    application."""
    config = ((details.get("applications") or {}).get(app_name) or {}).get("deployed_app_config")
    return {model: str(route["app"]) for model, route in live_routes(config or {}).items()}


def serving_application(details: dict[str, Any], app_name: str, model: str) -> str:
    """The application whose workers serve ``model`` for ``app_name``'s router: the one
    its live route names, else ``app_name`` itself."""
    return live_model_apps(details, app_name).get(model, app_name)


def scale_rows(
    details: dict[str, Any], app_name: str, queues: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per model: replicas now and targeted and limits, from the Serve REST API's
    application details (``GET /api/serve/applications/``), with the queue per tier
    from the service's ``GET /v1/status`` (``queues``: model -> tier -> queued). The
    models of ``app_name`` and those its router serves from their own applications."""
    applications = details.get("applications") or {}
    live = live_model_apps(details, app_name)
    workers: list[tuple[str, Any]] = [
        (name, deployment)
        for name, deployment in (
            (applications.get(app_name) or {}).get("deployments") or {}
        ).items()
        if worker_model(name) not in live
    ]
    for live_model, application in live.items():
        deployments = (applications.get(application) or {}).get("deployments") or {}
        workers += [(n, d) for n, d in deployments.items() if worker_model(n) == live_model]
    rows = []
    for name, deployment in sorted(workers, key=lambda pair: pair[0]):
        model = worker_model(name)
        if model is None:
            continue
        config = (deployment.get("deployment_config") or {}).get("autoscaling_config") or {}
        running = sum(1 for r in deployment.get("replicas") or [] if r.get("state") == "RUNNING")
        rows.append(
            {
                "model": model,
                "deployment": name,
                "replicas": running,
                "target_replicas": deployment.get("target_num_replicas"),
                "min": config.get("min_replicas"),
                "max": config.get("max_replicas"),
                "target_per_replica": config.get("target_ongoing_requests"),
                "queue": {tier: float(n) for tier, n in (queues.get(model) or {}).items()},
            }
        )
    return rows


# Cluster-wide settings of the deployed config that the application details show and
# that a redeploy without them would reset (a target_capacity rollout, gRPC options).
KEPT_SETTINGS = ("grpc_options", "target_capacity")


def changed_deployment(
    details: dict[str, Any], app_name: str, change: ScaleChange, *, free_class: int
) -> tuple[dict[str, Any], list[str]]:
    """The whole deployed Serve config (from the Serve REST API's, or the controller's,
    application details) with ``change`` applied to ``app_name``, and one line per value
    changed: what ``mediagate scale set`` and ``POST /v1/ops/limits`` deploy. A model
    served from an application of its own (``live_model_apps``) is changed there."""
    app_name = serving_application(details, app_name, change.model)
    app = (details.get("applications") or {}).get(app_name)
    if not app or not app.get("deployed_app_config"):
        raise ScaleError(
            f"application {app_name!r} was not deployed from a config (mediagate up / "
            "serve deploy); its limits cannot be changed live"
        )
    deployments = app.get("deployments") or {}
    worker = worker_deployment(change.model, deployments)
    current = (deployments[worker].get("deployment_config") or {}).get("autoscaling_config") or {}
    return apply_scale_change(
        deployed_config(details),
        app_name,
        change,
        current_limits=current,
        worker=worker,
        free_class=free_class,
    )


def deployed_config(details: dict[str, Any]) -> dict[str, Any]:
    """The whole Serve config deployed now, from the application details: what a
    change deploys again with its own edits (an application left out would be deleted)."""
    config: dict[str, Any] = {
        "proxy_location": details.get("proxy_location"),
        "http_options": details.get("http_options"),
        "applications": [
            copy.deepcopy(other["deployed_app_config"])
            for other in (details.get("applications") or {}).values()
            if other.get("deployed_app_config")
        ],
    }
    for kept in KEPT_SETTINGS:  # what the details show of the rest of the deployed config
        if details.get(kept) is not None:
            config[kept] = details[kept]
    return config
