"""`mediagate models list / add / swap / remove`: change the models of a running cluster
one at a time, leaving every other model's replicas, queues and running work alone
(each model version is a Serve application of its own: ``mediagate.cli.model_apps``).

Every change is checked before anything is applied (the pipeline class, the weights,
a node that can place a replica), goes through the Serve REST API as `mediagate scale
set` does, waits for what it started, and is audited. A new version serves only once
its replicas have loaded and warmed up; one that fails is taken away again, with the
reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from autoscaling.limits import deployed_config
from autoscaling.naming import worker_name
from mediagate.cli.audit import record
from mediagate.cli.command import CommandError, _layout
from mediagate.cli.model_apps import (
    live_models,
    model_application,
    router_app,
    with_application,
    with_retired,
    with_routes,
    without_application,
)
from mediagate.cli.scale import _dashboard_url
from mediagate.cli.service import ray_auth_headers, serve_client
from mediagate.protocol.catalog import LiveModel, ModelSpec
from models.catalog import load_catalog
from models.checks import pipeline_class_problems, placement_problems, weights_problems

READY_TIMEOUT_S = 900.0  # a large model's weights may take minutes to load
DRAIN_TIMEOUT_S = 600.0
POLL_S = 0.5
FAILED_STATUSES = ("DEPLOY_FAILED", "UNHEALTHY")


class Cluster:
    """The Serve REST API of one cluster, as the model commands use it."""

    def __init__(self, dashboard_url: str) -> None:
        self.dashboard_url = dashboard_url
        self.client = serve_client(dashboard_url)

    def config(self) -> dict[str, Any]:
        return deployed_config(self.client.get_serve_details())

    def apply(self, config: dict[str, Any]) -> None:
        self.client.deploy_applications(config)

    def applications(self) -> dict[str, Any]:
        return dict(self.client.get_serve_details().get("applications") or {})

    def node_resources(self) -> list[dict[str, float]]:
        """The total resources of every live node (the dashboard's state API)."""
        request = urllib.request.Request(
            f"{self.dashboard_url.rstrip('/')}/api/v0/nodes?detail=1&limit=10000",
            headers=ray_auth_headers(),
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                listing = json.loads(answer.read())
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise CommandError(f"cannot list the cluster's nodes: {error}") from None
        nodes = ((listing.get("data") or {}).get("result") or {}).get("result") or []
        return [
            {name: float(amount) for name, amount in (node.get("resources_total") or {}).items()}
            for node in nodes
            if node.get("state") == "ALIVE"
        ]

    def wait_running(self, names: list[str], timeout_s: float) -> None:
        """Until every application of ``names`` runs (its replicas up: a model's loaded
        and warmed up); a failure or the timeout raises with Serve's own messages."""
        deadline = time.monotonic() + timeout_s
        while True:
            applications = self.applications()
            statuses = {name: (applications.get(name) or {}).get("status") for name in names}
            failed = [name for name, status in statuses.items() if status in FAILED_STATUSES]
            if failed:
                raise CommandError(failure_message(applications[failed[0]], failed[0]))
            if all(status == "RUNNING" for status in statuses.values()):
                return
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{n} ({s})" for n, s in statuses.items() if s != "RUNNING")
                raise CommandError(f"not running after {timeout_s:.0f}s: {waiting}")
            time.sleep(POLL_S)

    def wait_drained(self, application: str, spec: ModelSpec, timeout_s: float) -> bool:
        """Until the retired ``application``'s workers have scaled to zero (nothing of
        it waits or runs any more); False if they have not within ``timeout_s``."""
        worker = worker_name(spec.task, spec.id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            app = self.applications().get(application)
            if app is None:
                return True
            deployment = (app.get("deployments") or {}).get(worker) or {}
            if deployment.get("target_num_replicas") == 0 and not deployment.get("replicas"):
                return True
            time.sleep(POLL_S)
        return False


def failure_message(application: dict[str, Any], name: str) -> str:
    """Serve's reason an application failed, with each failing deployment's message."""
    parts = [application.get("message") or ""]
    for deployment, details in (application.get("deployments") or {}).items():
        if details.get("status") in FAILED_STATUSES and details.get("message"):
            parts.append(f"{deployment}: {details['message']}")
    reason = " | ".join(part.strip() for part in parts if part and part.strip())
    return f"application {name} failed: {reason[-3000:] or 'no reason given'}"


def built_in_models(config: dict[str, Any]) -> set[str]:
    """Models the router application serves from its own arguments (not live)."""
    args = router_app(config).get("args") or {}
    if args.get("models") is not None:
        return set(args["models"])
    return set(load_catalog(args.get("catalog")).models)


def check_spec(cluster: Cluster, config: dict[str, Any], spec: ModelSpec) -> None:
    """Refuse, with every reason at once, a model that could not serve."""
    options = (router_app(config).get("args") or {}).get("worker_ray_actor_options")
    problems = [
        *pipeline_class_problems(spec),
        *weights_problems(spec),
        *placement_problems(options or spec.ray_actor_options(), cluster.node_resources()),
    ]
    if problems:
        raise CommandError(f"model {spec.id} refused, nothing changed: " + "; ".join(problems))


def spec_from_args(args: argparse.Namespace, config: dict[str, Any]) -> ModelSpec:
    """The new model's catalog entry: a catalog file's entry (``--spec-file``), else
    ``--like`` a served model (its caps, defaults, batching), then the flags."""
    base: dict[str, Any] = {}
    if args.spec_file:
        catalog = load_catalog(args.spec_file)
        if args.name not in catalog.models:
            raise CommandError(f"{args.spec_file} has no model {args.name!r}")
        base = catalog.models[args.name].model_dump()
    elif args.like:
        base = served_spec(config, args.like).model_dump()
    fields: dict[str, Any] = {**base, "id": args.name, "version": args.version or "1"}
    for flag, key in (
        ("source", "source"),
        ("task", "task"),
        ("pipeline_class", "pipeline_class"),
        ("gpus", "num_gpus"),
        ("accelerator", "accelerator_type"),
    ):
        if getattr(args, flag, None) is not None:
            fields[key] = getattr(args, flag)
    scaling = dict(fields.get("scaling") or {})
    if args.min_replicas is not None:
        scaling["min_replicas"] = args.min_replicas
    if args.max_replicas is not None:
        scaling["max_replicas"] = args.max_replicas
    fields["scaling"] = scaling
    if args.batch_size is not None:
        fields["batching"] = {**(fields.get("batching") or {}), "max_batch_size": args.batch_size}
    if "source" not in fields or "task" not in fields:
        raise CommandError("give --source and --task (or --like MODEL, or --spec-file FILE)")
    try:
        return ModelSpec.model_validate(fields)
    except ValueError as error:
        raise CommandError(f"model {args.name} refused, nothing changed: {error}") from None


def served_spec(config: dict[str, Any], model_id: str) -> ModelSpec:
    live = live_models(config)
    if model_id in live:
        return live[model_id].spec
    catalog = load_catalog((router_app(config).get("args") or {}).get("catalog"))
    if model_id in built_in_models(config) and model_id in catalog.models:
        return catalog.models[model_id]
    raise CommandError(f"no model {model_id!r} is served")


def next_version(version: str) -> str:
    return str(int(version) + 1) if version.isdigit() else f"{version}.1"


def write_live_catalog(config: dict[str, Any]) -> Path:
    """The live models as a catalog file under home (for the operator's records)."""
    layout = _layout()
    models = {
        model_id: route.spec.model_dump(mode="json", exclude={"id"}, exclude_defaults=True)
        for model_id, route in sorted(live_models(config).items())
        if route.accepting
    }
    layout.live_catalog.write_text(
        "# Written by `mediagate models` after each change: the models served as\n"
        "# applications of their own, as catalog entries.\n"
        + yaml.safe_dump({"models": models}, sort_keys=False)
    )
    return layout.live_catalog


def command_models_list(args: argparse.Namespace) -> int:
    cluster = Cluster(_dashboard_url(args.address))
    config = cluster.config()
    applications = cluster.applications()
    print(f"{'MODEL':<18} {'VERSION':<8} {'TASK':<14} {'STATUS':<10} {'REPLICAS':>8}  SOURCE")
    for model_id, route in sorted(live_models(config).items()):
        app = applications.get(route.app) or {}
        worker = (app.get("deployments") or {}).get(worker_name(route.spec.task, model_id)) or {}
        running = sum(1 for r in worker.get("replicas") or [] if r.get("state") == "RUNNING")
        status = app.get("status", "MISSING") if route.accepting else "REMOVING"
        print(
            f"{model_id:<18} {route.spec.version:<8} {route.spec.task:<14} {status:<10} "
            f"{running:>8}  {route.spec.source}"
        )
    for model_id in sorted(built_in_models(config) - set(live_models(config))):
        print(f"{model_id:<18} {'-':<8} {'-':<14} {'BUILT-IN':<10} {'-':>8}  (router application)")
    return 0


def _deploy_version(
    cluster: Cluster, config: dict[str, Any], spec: ModelSpec, timeout_s: float
) -> tuple[dict[str, Any], str]:
    """Start ``spec``'s application beside everything deployed and wait until it
    serves; on failure take it away again and raise why."""
    application = model_application(router_app(config), spec)
    name = application["name"]
    if name in cluster.applications():
        raise CommandError(f"application {name} is already deployed; choose another --version")
    print(f"starting {spec.id} version {spec.version} ({name}) ...", file=sys.stderr)
    started = time.monotonic()
    with_new = with_application(config, application)
    cluster.apply(with_new)
    try:
        cluster.wait_running([name], timeout_s)
    except CommandError as error:
        cluster.apply(config)  # what was deployed before: the new application goes
        record([f"model {spec.id} version {spec.version} failed to start: {error}"])
        raise CommandError(f"{error}; rolled back, nothing else changed") from None
    print(f"{name} ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return with_new, name


def command_models_add(args: argparse.Namespace) -> int:
    cluster = Cluster(_dashboard_url(args.address))
    config = cluster.config()
    served = built_in_models(config) | {m for m, r in live_models(config).items() if r.accepting}
    if args.name in served:
        raise CommandError(f"model {args.name!r} is served already; use `mediagate models swap`")
    spec = spec_from_args(args, config)
    check_spec(cluster, config, spec)
    deployed, name = _deploy_version(cluster, config, spec, args.ready_timeout_s)
    routed = with_routes(deployed, {spec.id: LiveModel(app=name, spec=spec)})
    cluster.apply(routed)
    cluster.wait_running([router_app(routed)["name"]], args.ready_timeout_s)
    record([f"model {spec.id} added: version {spec.version} from {spec.source} ({name})"])
    print(f"model {spec.id} serves (catalog: {write_live_catalog(routed)})", file=sys.stderr)
    return 0


def command_models_swap(args: argparse.Namespace) -> int:
    cluster = Cluster(_dashboard_url(args.address))
    config = cluster.config()
    old = live_models(config).get(args.name)
    if old is None or not old.accepting:
        raise CommandError(
            f"model {args.name!r} is not served from an application of its own "
            "(`mediagate models list`); add it with `mediagate models add`"
        )
    update: dict[str, Any] = {"version": args.version or next_version(old.spec.version)}
    if args.source:
        update["source"] = args.source
    if args.pipeline_class:
        update["pipeline_class"] = args.pipeline_class
    spec = ModelSpec.model_validate({**old.spec.model_dump(), **update})
    check_spec(cluster, config, spec)
    deployed, name = _deploy_version(cluster, config, spec, args.ready_timeout_s)
    moved = with_retired(
        with_routes(deployed, {spec.id: LiveModel(app=name, spec=spec)}), old.app, old.spec, "moved"
    )
    cluster.apply(moved)  # new requests go to the new version; the old one finishes its own
    print(f"traffic moved to version {spec.version}; draining {old.app} ...", file=sys.stderr)
    drained = cluster.wait_drained(old.app, old.spec, args.drain_timeout_s)
    cluster.apply(without_application(moved, old.app))
    record(
        [
            f"model {spec.id} swapped: version {old.spec.version} ({old.spec.source}) -> "
            f"{spec.version} ({spec.source})"
            + ("" if drained else f"; {old.app} removed before its work ended")
        ]
    )
    if not drained:
        print(
            f"warning: {old.app} still had work after {args.drain_timeout_s:.0f}s and was "
            "removed anyway (its video jobs run again on the new version)",
            file=sys.stderr,
        )
    print(f"model {spec.id} serves version {spec.version}", file=sys.stderr)
    write_live_catalog(moved)
    return 0


def command_models_remove(args: argparse.Namespace) -> int:
    cluster = Cluster(_dashboard_url(args.address))
    config = cluster.config()
    route = live_models(config).get(args.name)
    if route is None:
        hint = (
            " (it is built into the router application: take it out of args.models there)"
            if args.name in built_in_models(config)
            else ""
        )
        raise CommandError(f"model {args.name!r} is not served from its own application{hint}")
    mode = "removed" if args.now else "drain"
    closed = with_retired(
        with_routes(config, {args.name: route.model_copy(update={"accepting": False})}),
        route.app,
        route.spec,
        mode,
    )
    cluster.apply(closed)  # 404 for new requests at once
    print(
        f"{args.name} takes no new requests; "
        + ("failing its queued and running work" if args.now else "serving what it holds")
        + " ...",
        file=sys.stderr,
    )
    drained = cluster.wait_drained(route.app, route.spec, args.drain_timeout_s)
    removed = with_routes(without_application(closed, route.app), {args.name: None})
    cluster.apply(removed)
    record(
        [
            f"model {args.name} removed (version {route.spec.version}, "
            + ("queued and running work failed, not charged" if args.now else "drained")
            + ("" if drained else f"; stopped after {args.drain_timeout_s:.0f}s")
            + ")"
        ]
    )
    write_live_catalog(removed)
    print(f"model {args.name} removed", file=sys.stderr)
    return 0


def add_model_commands(commands: Any) -> None:
    """The `mediagate models ...` parsers."""
    models = commands.add_parser(
        "models", help="add, swap and remove models on the running cluster"
    ).add_subparsers(dest="models", required=True)
    listing = models.add_parser("list", help="models served, their versions and replicas")
    listing.set_defaults(handler=command_models_list)
    add = models.add_parser("add", help="serve a new model without touching the others")
    add.add_argument("name", help="public model id (the API's `model`)")
    add.add_argument("--source", help="tiny://NAME, hf://ORG/NAME[@REV], s3://BUCKET/PREFIX, DIR")
    add.add_argument("--task", choices=("text-to-image", "text-to-video"))
    add.add_argument("--pipeline-class", help="diffusers pipeline class (default: the base's)")
    add.add_argument("--gpus", type=float, help="GPUs per replica (0: run on CPUs)")
    add.add_argument("--accelerator", help="Ray accelerator type, e.g. A10G")
    add.add_argument("--min-replicas", type=int)
    add.add_argument("--max-replicas", type=int)
    add.add_argument("--batch-size", type=int, help="most images in one pipeline call")
    add.add_argument("--like", help="start from a served model's entry (caps, defaults)")
    add.add_argument("--spec-file", help="a catalog YAML holding the model's whole entry")
    add.add_argument("--version", help="version name (default: 1)")
    add.set_defaults(handler=command_models_add)
    swap = models.add_parser("swap", help="serve new weights for a model, without downtime")
    swap.add_argument("name")
    swap.add_argument("--source", help="the new version's weights")
    swap.add_argument("--pipeline-class")
    swap.add_argument("--version", help="version name (default: the next number)")
    swap.set_defaults(handler=command_models_swap)
    remove = models.add_parser("remove", help="stop serving a model (404 at once)")
    remove.add_argument("name")
    remove.add_argument(
        "--now",
        action="store_true",
        help="fail its queued and running work at once (not charged) instead of serving it",
    )
    remove.set_defaults(handler=command_models_remove)
    for command in (listing, add, swap, remove):
        command.add_argument("--address", help="Ray dashboard URL (default: from `mediagate up`)")
    for command in (add, swap):
        command.add_argument("--ready-timeout-s", type=float, default=READY_TIMEOUT_S)
    for command in (swap, remove):
        command.add_argument("--drain-timeout-s", type=float, default=DRAIN_TIMEOUT_S)
    add.set_defaults(drain_timeout_s=DRAIN_TIMEOUT_S)
    remove.set_defaults(ready_timeout_s=READY_TIMEOUT_S)
