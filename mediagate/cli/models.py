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
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from autoscaling.naming import worker_name
from mediagate.cli.audit import record
from mediagate.cli.command import CommandError, _layout
from mediagate.cli.model_apps import (
    deployment_entries,
    live_models,
    model_application,
    out_of_standby,
    router_app,
    standing_by,
    with_application,
    with_retired,
    with_routes,
    without_application,
)
from mediagate.cli.model_cluster import Cluster, one_change_at_a_time
from mediagate.cli.scale import _dashboard_url
from mediagate.protocol.catalog import LiveModel, ModelSpec
from models.catalog import load_catalog
from models.checks import pipeline_class_problems, placement_problems, weights_problems

READY_TIMEOUT_S = 900.0  # a large model's weights may take minutes to load
DRAIN_TIMEOUT_S = 600.0
DELETE_TIMEOUT_S = 120.0  # what a removed model has left, and Serve's graceful shutdown


def built_in_models(config: dict[str, Any]) -> set[str]:
    """Models the router application serves from its own arguments (not live)."""
    args = router_app(config).get("args") or {}
    if args.get("models") is not None:
        return set(args["models"])
    return set(load_catalog(args.get("catalog")).models)


def check_spec(
    cluster: Cluster,
    config: dict[str, Any],
    spec: ModelSpec,
    entries: list[dict[str, Any]] | None = None,
) -> None:
    """Refuse, with every reason at once, a model that could not serve (``entries``:
    its deployment entries, whose ray_actor_options win, as Serve applies them)."""
    name = worker_name(spec.task, spec.id)
    worker = next((entry for entry in entries or [] if entry.get("name") == name), {})
    shared = (router_app(config).get("args") or {}).get("worker_ray_actor_options")
    options = worker.get("ray_actor_options") or shared
    problems = [
        *pipeline_class_problems(spec),
        *weights_problems(spec),
        *placement_problems(options or spec.ray_actor_options(), cluster.node_resources()),
    ]
    if problems:
        raise CommandError(f"model {spec.id} refused, nothing changed: " + "; ".join(problems))


# The catalog fields `models add` and `swap` take as flags (flag -> field).
SPEC_FLAGS = {
    "source": "source",
    "task": "task",
    "pipeline_class": "pipeline_class",
    "gpus": "num_gpus",
    "accelerator": "accelerator_type",
    "host_memory": "host_memory",
}


def flagged_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The catalog fields the command line sets (a command without a flag sets none)."""
    return {
        field: getattr(args, flag)
        for flag, field in SPEC_FLAGS.items()
        if getattr(args, flag, None) is not None
    }


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
    fields |= flagged_fields(args)
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
    cluster: Cluster,
    spec: ModelSpec,
    entries: list[dict[str, Any]] | None,
    timeout_s: float,
    *,
    beside_live: bool = False,
) -> str:
    """Start ``spec``'s application beside everything deployed and wait until it
    serves; on any failure (or an interruption) take it away again and say why.
    ``beside_live``: another version serves the model meanwhile (``standing_by``)."""
    application = model_application(router_app(cluster.config()), spec, entries)
    if beside_live:
        application = standing_by(application, spec)
    name = application["name"]
    if name in cluster.applications():
        raise CommandError(f"application {name} is already deployed; choose another --version")
    print(f"starting {spec.id} version {spec.version} ({name}) ...", file=sys.stderr)
    started = time.monotonic()
    try:
        cluster.change(lambda config: with_application(config, application))
        cluster.wait_running([name], timeout_s)
    except BaseException as error:
        cluster.change(lambda config: without_application(config, name))
        record([f"model {spec.id} version {spec.version} failed to start: {error}"])
        raise CommandError(f"{error}; rolled back, nothing else changed") from None
    print(f"{name} ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return name


def _withdraw_unrouted(cluster: Cluster, spec: ModelSpec, name: str, error: BaseException) -> None:
    """A swap stopped after its new version started but before traffic moved to it:
    take that version away again (it serves nothing and, in standby, holds no job)."""
    try:
        live = live_models(cluster.config()).get(spec.id)
        if live is not None and live.app == name:
            return  # the route did move: the swap's remaining steps are to be re-run
        cluster.change(lambda config: without_application(config, name))
    except Exception as cleanup:
        print(f"warning: could not remove {name} ({cleanup}); remove it by hand", file=sys.stderr)
        return
    record([f"model {spec.id} version {spec.version} removed again: the swap stopped ({error!r})"])


def _retire(cluster: Cluster, route: LiveModel, mode: str, timeout_s: float) -> bool:
    """Retire ``route``'s version (``mode``), once Serve has applied it wait until its
    workers are at zero; whether they got there within ``timeout_s``."""
    limits = cluster.worker_limits(route.app, route.spec)
    cluster.change(lambda config: with_retired(config, route.app, route.spec, mode, limits))
    cluster.wait_running([route.app], timeout_s)  # its scheduler has the retirement
    draining = time.monotonic()
    drained = cluster.wait_drained(route.app, route.spec, timeout_s)
    print(f"{route.app} drained in {time.monotonic() - draining:.1f}s", file=sys.stderr)
    return drained


def command_models_add(args: argparse.Namespace) -> int:
    cluster = Cluster(_dashboard_url(args.address))
    with one_change_at_a_time():
        config = cluster.config()
        live = live_models(config)
        if args.name in built_in_models(config) | set(live):
            hint = "use `mediagate models swap`" if args.name in live else "it is built in"
            raise CommandError(f"model {args.name!r} is served already ({hint})")
        spec = spec_from_args(args, config)
        check_spec(cluster, config, spec)
        name = _deploy_version(cluster, spec, None, args.ready_timeout_s)
        route = LiveModel(app=name, spec=spec)
        routed = cluster.change(lambda config: with_routes(config, {spec.id: route}))
        record([f"model {spec.id} added: version {spec.version} from {spec.source} ({name})"])
        cluster.wait_running([router_app(routed)["name"]], args.ready_timeout_s)
        print(f"model {spec.id} serves (catalog: {write_live_catalog(routed)})", file=sys.stderr)
    return 0


def command_models_swap(args: argparse.Namespace) -> int:
    cluster = Cluster(_dashboard_url(args.address))
    with one_change_at_a_time():
        config = cluster.config()
        old = live_models(config).get(args.name)
        if old is None or not old.accepting:
            raise CommandError(
                f"model {args.name!r} is not served from an application of its own "
                "(`mediagate models list`): a built-in model changes only with a redeploy "
                "of the router's application"
            )
        update: dict[str, Any] = {"version": args.version or next_version(old.spec.version)}
        update |= flagged_fields(args)
        spec = ModelSpec.model_validate({**old.spec.model_dump(), **update})
        # the running version's placement, limits and scheduler settings carry over
        entries = deployment_entries(config, old.app)
        if args.gpus is not None or args.accelerator is not None:
            for entry in entries:
                entry.pop("ray_actor_options", None)
        check_spec(cluster, config, spec, entries)
        name = _deploy_version(cluster, spec, entries, args.ready_timeout_s, beside_live=True)
        route = LiveModel(app=name, spec=spec)
        # new requests go to the new version, which now takes the model's queued jobs
        # too; the old one finishes what it holds
        try:
            cluster.change(
                lambda config: out_of_standby(with_routes(config, {spec.id: route}), name, spec)
            )
        except BaseException as error:
            _withdraw_unrouted(cluster, spec, name, error)
            raise
        print(f"traffic moved to version {spec.version}; draining {old.app}", file=sys.stderr)
        drained = _retire(cluster, old, "moved", args.drain_timeout_s)
        cluster.delete(lambda config: without_application(config, old.app), old.app)
        record(
            [
                f"model {spec.id} swapped: version {old.spec.version} ({old.spec.source}) -> "
                f"{spec.version} ({spec.source})"
                + ("" if drained else f"; {old.app} removed before its work ended")
            ]
        )
        if not drained:
            print(
                f"warning: {old.app} still had work after {args.drain_timeout_s:.0f}s and "
                "was removed anyway (its video jobs run again on the new version)",
                file=sys.stderr,
            )
        write_live_catalog(cluster.config())
        print(f"model {spec.id} serves version {spec.version}", file=sys.stderr)
    return 0


def command_models_remove(args: argparse.Namespace) -> int:
    cluster = Cluster(_dashboard_url(args.address))
    with one_change_at_a_time():
        config = cluster.config()
        route = live_models(config).get(args.name)
        if route is None:
            hint = (
                " (it is built into the router application: take it out of args.models "
                "there, which restarts that application)"
                if args.name in built_in_models(config)
                else ""
            )
            raise CommandError(f"model {args.name!r} is not served from its own application{hint}")
        closed = route.model_copy(update={"accepting": False})
        cluster.change(lambda config: with_routes(config, {args.name: closed}))  # 404 at once
        print(
            f"{args.name} takes no new requests; "
            + ("failing its queued and running work" if args.now else "serving what it holds"),
            file=sys.stderr,
        )
        drained = _retire(cluster, route, "removed" if args.now else "drain", args.drain_timeout_s)
        if not drained:  # what is left fails (not charged) rather than hang forever
            print(f"{route.app} still had work: failing it", file=sys.stderr)
            _retire(cluster, route, "removed", DELETE_TIMEOUT_S)

        def removed(config: dict[str, Any]) -> dict[str, Any]:
            return with_routes(without_application(config, route.app), {args.name: None})

        cluster.delete(removed, route.app)
        record(
            [
                f"model {args.name} removed (version {route.spec.version}, "
                + ("queued and running work failed, not charged" if args.now else "drained")
                + ("" if drained else f"; what was left after {args.drain_timeout_s:.0f}s failed")
                + ")"
            ]
        )
        write_live_catalog(cluster.config())
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
    swap.add_argument("--gpus", type=float, help="GPUs per replica (0: run on CPUs)")
    swap.add_argument("--accelerator", help="Ray accelerator type, e.g. A10G")
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
        command.add_argument(
            "--host-memory",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="keep the loaded model in each node's host memory for the next replica "
            "there (catalog `host_memory`; default: the base entry's, else off)",
        )
    for command in (swap, remove):
        command.add_argument("--drain-timeout-s", type=float, default=DRAIN_TIMEOUT_S)
    add.set_defaults(drain_timeout_s=DRAIN_TIMEOUT_S)
    remove.set_defaults(ready_timeout_s=READY_TIMEOUT_S)
