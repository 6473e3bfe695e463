"""Models as Serve applications of their own, as config data: pure functions from one
Serve config to the next, for `mediagate up` (the catalog's models split out of the
router's application) and `mediagate models` (add, swap, remove).

Serve restarts every replica of an application whose ``args`` change, but applies a
change of ``user_config`` or of autoscaling numbers in place. So each model version is
an application (``model-<id>-v<version>``: its scheduler and workers, built by
``deployments.model_app:build_model_app``), and the router's ``user_config``
(``live_models``) says which application serves each model id: adding, swapping or
removing one model changes that one application and the router's ``user_config``,
and nothing of any other model.
"""

from __future__ import annotations

import copy
from typing import Any

from autoscaling.limits import AUTOSCALING_NUMBERS, live_routes
from autoscaling.naming import (
    ROUTER,
    scheduler_name,
    worker_autoscaling_config,
    worker_model,
    worker_name,
)
from mediagate.cli.command import CommandError
from mediagate.protocol.catalog import Catalog, LiveModel, ModelSpec

ROUTER_APP_IMPORT = "deployments.app:build_app"
MODEL_APP_IMPORT = "deployments.model_app:build_model_app"
WORKER_POLICY = {"policy_function": "autoscaling.policy:scale_workers"}
# The router application's arguments that every model application shares (its
# ``ServiceArgs``): copied, so that a model writes to the same state and files.
SHARED_ARGS = (
    "home",
    "catalog",
    "video",
    "state",
    "tiers_file",
    "artifacts",
    "provenance",
    "moderation",
    "worker_ray_actor_options",
)
# The ray_actor_options that say where a replica goes rather than what it uses.
PLACEMENT_OPTIONS = ("resources", "label_selector")
RETIRED_MODES = ("moved", "drain", "removed")


class ModelChangeError(CommandError):
    """A model change that cannot be made; nothing was changed."""


def app_name(model_id: str, version: str) -> str:
    return f"model-{model_id}-v{version}"


def router_app(config: dict[str, Any]) -> dict[str, Any]:
    """The application holding the router (built by ``deployments.app:build_app``)."""
    for app in config.get("applications") or []:
        if app.get("import_path") == ROUTER_APP_IMPORT:
            return dict(app)
    raise ModelChangeError("no mediagate router application is deployed (mediagate up first)")


def _entry(app: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of ``app``'s config entry for deployment ``name`` (a new one if none)."""
    for entry in app.get("deployments") or []:
        if entry.get("name") == name:
            return copy.deepcopy(dict(entry))
    return {"name": name}


def _app(config: dict[str, Any], name: str) -> dict[str, Any]:
    for app in config.get("applications") or []:
        if app.get("name") == name:
            return dict(app)
    raise ModelChangeError(f"application {name!r} is not deployed")


def live_models(config: dict[str, Any]) -> dict[str, LiveModel]:
    """The router's routes to model applications (its ``user_config.live_models``)."""
    raw = live_routes(router_app(config))
    return {model_id: LiveModel.model_validate(route) for model_id, route in raw.items()}


def model_application(
    router: dict[str, Any], spec: ModelSpec, overrides: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The Serve config entry of ``spec``'s own application: the router application's
    shared arguments, the whole spec, the queue-driven autoscaling policy, and
    ``overrides`` (per-deployment entries: ray_actor_options, autoscaling numbers)."""
    shared = {key: value for key, value in (router.get("args") or {}).items() if key in SHARED_ARGS}
    # The worker's entry always carries an autoscaling_config: Serve counts the entries
    # that have one into the code version (their policies), so adding one later (a
    # retirement, a `scale set`) would restart the application.
    entries = copy.deepcopy(overrides or [])
    name = worker_name(spec.task, spec.id)
    worker = next((entry for entry in entries if entry.get("name") == name), None)
    if worker is None:
        worker = {"name": name}
        entries.append(worker)
    worker.setdefault("autoscaling_config", worker_autoscaling_config(spec.scaling))
    scheduler = scheduler_name(spec.id)
    if not any(entry.get("name") == scheduler for entry in entries):
        entries.append({"name": scheduler, "ray_actor_options": beside_the_router(router)})
    application: dict[str, Any] = {
        "name": app_name(spec.id, spec.version),
        "route_prefix": None,  # reached by handle from the router, never over HTTP
        "import_path": MODEL_APP_IMPORT,
        "autoscaling_policy": dict(WORKER_POLICY),
        "args": {**copy.deepcopy(shared), "spec": spec.model_dump(mode="json")},
        "deployments": entries,
    }
    if router.get("runtime_env"):
        application["runtime_env"] = copy.deepcopy(router["runtime_env"])
    return application


def beside_the_router(router: dict[str, Any]) -> dict[str, Any]:
    """Where a new model's scheduler goes when nothing says: where the router goes (on a
    GPU cluster, the CPU head's custom resource or label: serve.gpu.yaml), with no CPU
    of its own, like every built-in scheduler. Without it Serve may place the scheduler
    on a GPU node, and its actor's start takes that node's CPU from a serving model."""
    options = _entry(router, ROUTER).get("ray_actor_options") or {}
    placement = {key: copy.deepcopy(options[key]) for key in PLACEMENT_OPTIONS if key in options}
    return {"num_cpus": 0, **placement}


def _replace_app(config: dict[str, Any], app: dict[str, Any]) -> None:
    applications = config["applications"]
    for index, other in enumerate(applications):
        if other.get("name") == app["name"]:
            applications[index] = app
            return
    applications.append(app)


def with_routes(config: dict[str, Any], routes: dict[str, LiveModel | None]) -> dict[str, Any]:
    """``config`` with the router's live routes changed (``None``: route removed)."""
    new = copy.deepcopy(config)
    router = router_app(new)
    entry = _entry(router, ROUTER)
    user_config = dict(entry.get("user_config") or {})
    if "tiers" not in user_config:  # the one Serve would otherwise have kept
        user_config.setdefault("tiers_file", (router.get("args") or {}).get("tiers_file"))
    live = dict(user_config.get("live_models") or {})
    for model_id, route in routes.items():
        if route is None:
            live.pop(model_id, None)
        else:
            live[model_id] = route.model_dump(mode="json")
    user_config["live_models"] = live
    entry["user_config"] = user_config
    others = [other for other in router.get("deployments") or [] if other.get("name") != ROUTER]
    router["deployments"] = [entry, *others]
    _replace_app(new, router)
    return new


def with_application(config: dict[str, Any], application: dict[str, Any]) -> dict[str, Any]:
    new = copy.deepcopy(config)
    _replace_app(new, copy.deepcopy(application))
    return new


def deployment_entries(config: dict[str, Any], application: str) -> list[dict[str, Any]]:
    """``application``'s per-deployment entries (placement, limits, user_config), without
    a retirement: what a new version of its model starts with."""
    entries = copy.deepcopy(_app(config, application).get("deployments") or [])
    for entry in entries:
        user_config = entry.get("user_config")
        if isinstance(user_config, dict):
            user_config.pop("retired", None)
            user_config.pop("standby", None)  # (the next version starts in its own)
    return entries


def standing_by(application: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """A new version's application, started beside the live one (a swap): a video
    model's scheduler then takes no job from the store until traffic moves to it
    (``out_of_standby``). In its arguments, so it holds from the replica's first moment
    (a ``user_config`` arrives only after the constructor has begun recovering jobs).
    Image schedulers hold nothing in the store: their application is as given."""
    if spec.task != "text-to-video":
        return application
    application = copy.deepcopy(application)
    args = application["args"]
    args["video"] = {**(args.get("video") or {}), "standby": True}
    return application


def out_of_standby(config: dict[str, Any], application: str, spec: ModelSpec) -> dict[str, Any]:
    """``config`` with ``application``'s video scheduler out of standby: its
    ``user_config`` overrides the argument, in place (the version is not restarted)."""
    if spec.task != "text-to-video":
        return config
    new = copy.deepcopy(config)
    app = _app(new, application)
    scheduler = _entry(app, scheduler_name(spec.id))
    scheduler["user_config"] = {**(scheduler.get("user_config") or {}), "standby": False}
    entries = app.get("deployments") or []
    kept = [scheduler if entry.get("name") == scheduler["name"] else entry for entry in entries]
    app["deployments"] = kept if scheduler in kept else [*kept, scheduler]
    _replace_app(new, app)
    return new


def without_application(config: dict[str, Any], name: str) -> dict[str, Any]:
    new = copy.deepcopy(config)
    new["applications"] = [app for app in new["applications"] if app.get("name") != name]
    return new


def with_retired(
    config: dict[str, Any],
    application: str,
    spec: ModelSpec,
    mode: str,
    deployed_limits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``config`` with ``application``'s model version retired: its scheduler takes no
    new work (``mode``: moved, drain or removed; ``deployments.scheduler.retirement``)
    and its workers may go to zero, which the autoscaling policy does only once
    nothing waits or runs (until then it keeps every replica it has: Serve would stop
    any of them, busy or not). ``deployed_limits`` are the worker's deployed
    autoscaling numbers (kept, bar the minimum). Both are in-place updates of that
    application alone."""
    if mode not in RETIRED_MODES:
        raise ModelChangeError(f"unknown retirement {mode!r}")
    new = copy.deepcopy(config)
    app = _app(new, application)
    scheduler = _entry(app, scheduler_name(spec.id))
    scheduler["user_config"] = {**(scheduler.get("user_config") or {}), "retired": mode}
    worker = _entry(app, worker_name(spec.task, spec.id))
    autoscaling = {
        key: value
        for key, value in {
            **(deployed_limits or {}),
            **(worker.get("autoscaling_config") or {}),
        }.items()
        if key in AUTOSCALING_NUMBERS and key != "initial_replicas" and value is not None
    }
    autoscaling |= {"min_replicas": 0, "downscale_delay_s": 0, "downscale_to_zero_delay_s": 0}
    autoscaling.setdefault("max_replicas", 1)
    worker["autoscaling_config"] = autoscaling
    worker.pop("num_replicas", None)  # autoscaled: Serve refuses both
    changed = {scheduler["name"]: scheduler, worker["name"]: worker}
    app["deployments"] = [changed.pop(entry["name"], entry) for entry in app["deployments"]]
    app["deployments"] += list(changed.values())
    _replace_app(new, app)
    return new


def split_models(config: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """The config `mediagate up` deploys: every model of the router application's
    ``args.models`` (all of the catalog's when unset) moved into an application of its
    own, with the deployment entries that name it, and routed from the router's
    ``user_config``. Applications already split are left as they are."""
    new = copy.deepcopy(config)
    try:
        router = router_app(new)
    except ModelChangeError:
        return new
    args = router.setdefault("args", {}) or {}
    wanted = args.get("models")
    model_ids = list(catalog.models) if wanted is None else list(wanted)
    unknown = sorted(set(model_ids) - set(catalog.models))
    if unknown:
        raise ModelChangeError(f"models not in the catalog: {', '.join(unknown)}")
    routes: dict[str, LiveModel | None] = {}
    kept: list[dict[str, Any]] = []
    moved: dict[str, list[dict[str, Any]]] = {model_id: [] for model_id in model_ids}
    for entry in router.get("deployments") or []:
        name = str(entry.get("name", ""))
        model = worker_model(name) or (
            name.removeprefix("Scheduler-") if name.startswith("Scheduler-") else None
        )
        if model in moved:
            moved[model].append(entry)
        else:
            kept.append(entry)
    router["deployments"] = kept
    args["models"] = []
    router["args"] = args
    _replace_app(new, router)
    for model_id in model_ids:
        spec = catalog.models[model_id]
        application = model_application(router, spec, moved[model_id])
        _replace_app(new, application)
        routes[model_id] = LiveModel(app=application["name"], spec=spec)
    return with_routes(new, routes)
