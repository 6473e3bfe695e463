"""`mediagate up` and `mediagate down`: a local Ray head (or `--address`), the Serve config
deployed through Serve's REST API (as `serve deploy` does, so later changes are
lightweight updates), readiness, and stopping only the Ray session it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mediagate.cli.command import CommandError, _layout
from mediagate.cli.local_ray import (
    DEFAULT_INGRESS,
    LOOPBACK,
    SERVE_THROUGHPUT_ENVIRONMENT,
    WORKER_PRIORITY_ENVIRONMENT,
    LocalRayPorts,
    haproxy_link,
    local_ray_environment,
    ray_auth_token,
    ray_executable,
    ray_start_command,
)
from mediagate.cli.model_apps import ROUTER_APP_IMPORT, split_models
from mediagate.provenance.certificates import ensure_local_certificate
from mediagate.settings import HomeLayout
from models.catalog import load_catalog

DEFAULT_DASHBOARD_PORT = 8265


DEFAULT_RAY_PORT = 6390


READY_TIMEOUT_S = 900


def ray_auth_headers() -> dict[str, str]:
    """The cluster's token as an HTTP header, when there is one (``ray_auth_token``).
    Sent explicitly, because Ray decides once per process whether to send it itself,
    and a process that has used Ray before may have decided "no"."""
    token = ray_auth_token(_layout())
    return {"authorization": f"Bearer {token}"} if token else {}


def serve_client(dashboard_url: str) -> Any:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard_url, headers=ray_auth_headers())


def effective_config(
    config_path: str | None, host: str, port: int, home: Path, public_url: str | None = None
) -> dict[str, Any]:
    """The Serve config to deploy: the given (or shipped) file with host, port and home
    set, and the base of download URLs (``public_url``, else the address it serves on)."""
    if config_path is None:
        text = resources.files("mediagate").joinpath("configs/serve.yaml").read_text()
    else:
        text = Path(config_path).read_text()
    config = yaml.safe_load(text)
    config.setdefault("http_options", {}).update({"host": host, "port": port})
    for application in config.get("applications", []):
        args = application.setdefault("args", {}) or {}
        application["args"] = args
        if not args.get("home"):
            args["home"] = str(home)
        router = args.setdefault("router", {}) or {}
        args["router"] = router
        # download URLs' base (never a request's Host header)
        router.setdefault("public_base_url", public_url or _local_url(host, port))
    # Each model an application of its own, so that `mediagate models` changes one
    # model without restarting the others (mediagate.cli.model_apps).
    routers = [
        app for app in config.get("applications", []) if app.get("import_path") == ROUTER_APP_IMPORT
    ]
    if routers:
        catalog_path = (routers[0].get("args") or {}).get("catalog")
        try:
            catalog = load_catalog(catalog_path)
        except OSError as error:  # a path on the cluster's nodes, not here
            print(
                f"note: the catalog is not readable here ({error}): its models stay in the "
                "router's application (`mediagate models` can add others beside them)",
                file=sys.stderr,
            )
        else:
            config = split_models(config, catalog)
    return config


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _local_url(host: str, port: int) -> str:
    reachable = "127.0.0.1" if host in WILDCARD_HOSTS else host
    if ":" in reachable:  # an IPv6 address
        reachable = f"[{reachable}]"
    return f"http://{reachable}:{port}"


def _wait_until_ready(client: Any, base_url: str, timeout_s: float) -> None:
    """Ready = every application RUNNING (all replicas up) and the router answering."""
    deadline = time.monotonic() + timeout_s
    last_status = ""
    while time.monotonic() < deadline:
        details = client.get_serve_details()
        applications = details.get("applications") or {}
        for name, app in applications.items():
            status = app.get("status")
            if status == "DEPLOY_FAILED":
                raise CommandError(f"application {name} failed to deploy: {app.get('message')}")
            if status != last_status:
                print(f"application {name}: {status}", file=sys.stderr)
                last_status = status
        running = bool(applications) and all(
            app.get("status") == "RUNNING" for app in applications.values()
        )
        if running:
            try:
                with urllib.request.urlopen(f"{base_url}/healthz", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(1)
    waiting = _unready_deployments(client.get_serve_details())
    raise CommandError(
        f"the service was not ready within {timeout_s:.0f}s; not yet running: {waiting or '?'} "
        "(a worker asking for a GPU this machine lacks waits forever: see num_gpus in the config)"
    )


def _unready_deployments(details: dict[str, Any]) -> str:
    names = []
    for app in (details.get("applications") or {}).values():
        for name, deployment in (app.get("deployments") or {}).items():
            if deployment.get("status") != "HEALTHY":
                names.append(f"{name} ({deployment.get('status')})")
    return ", ".join(names)


def _start_ray(args: argparse.Namespace, layout: HomeLayout, ports: LocalRayPorts) -> str:
    """`ray start --head` locked down (``mediagate.cli.local_ray``); the dashboard URL."""
    environment = local_ray_environment(layout, ports, args.ingress or DEFAULT_INGRESS)
    command = ray_start_command(ray_executable(), ports, args.num_cpus or os.cpu_count() or 1)
    print("starting Ray:", " ".join(command[1:]), file=sys.stderr)
    completed = subprocess.run(
        command, env={**os.environ, **environment}, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise CommandError(f"`ray start` failed:\n{completed.stderr[-2000:]}")
    return f"http://{LOOPBACK}:{ports.dashboard}"


def ray_temp_dir() -> Path:
    """Where `ray start` keeps its sessions (Ray's rule: RAY_TMPDIR, else TMPDIR on
    Linux, else /tmp; then `ray/`)."""
    linux_tmp = os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    return Path(os.environ.get("RAY_TMPDIR") or linux_tmp or "/tmp") / "ray"


def ray_session_processes(session_dir: str) -> list[Any]:
    """The processes of one Ray session: its daemons (GCS, raylet, dashboard, monitors:
    each names the session directory on its command line) and everything they started
    (workers, replicas, HAProxy)."""
    import psutil

    found: dict[int, Any] = {}
    for process in psutil.process_iter(["cmdline"]):
        if any(session_dir in part for part in process.info["cmdline"] or ()):
            found[process.pid] = process
            with contextlib.suppress(psutil.Error):
                for child in process.children(recursive=True):
                    found[child.pid] = child
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_ray_session(
    session_dir: str, gcs_port: int, *, grace_s: float = 5.0, known: Iterable[Any] = ()
) -> int:
    """Stop only the Ray instance `mediagate up` started (`ray stop` would stop every Ray
    on the machine): SIGTERM its processes (those found now, and ``known`` ones found
    before), SIGKILL what is left after ``grace_s``."""
    import psutil

    found = {process.pid: process for process in known}
    found |= {process.pid: process for process in ray_session_processes(session_dir)}
    processes = list(found.values())
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    forget_cluster_address(session_dir, gcs_port)
    return len(processes)


def stop_own_ray() -> None:
    """Stop the local Ray instance this process started as its driver (``ray.init``
    with ``address="local"``), with everything on it (replicas, HAProxy), without
    Serve's shutdown first: that waits out each replica's graceful stop, tens of
    seconds nothing needs when the whole instance goes. A driver that joined a Ray it
    did not start only disconnects."""
    import ray

    node: Any = ray._private.worker.global_worker.node
    if node is None or not node.all_processes:  # not started here (or not at all)
        ray.shutdown()
        return
    session_dir, gcs_port = node.get_session_dir_path(), int(node.gcs_address.rsplit(":", 1)[1])
    # Found while the raylet lives: workers (their titles no longer name the session)
    # and what they started (HAProxy) are reached as its children.
    processes = ray_session_processes(session_dir)
    ray.shutdown()
    stop_ray_session(session_dir, gcs_port, known=processes)


def forget_cluster_address(session_dir: str, gcs_port: int) -> None:
    """Remove Ray's "current cluster" file when it names the stopped cluster (as `ray
    stop` does): a later `ray.init()` on this machine would otherwise try to join a
    cluster that is gone."""
    address_file = Path(session_dir).parent / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if address_file.read_text().strip().endswith(f":{gcs_port}"):
            address_file.unlink()


def _stop(run: dict[str, Any]) -> None:
    """Delete the applications from a cluster `up` did not start; stop the Ray that it
    did start (which ends its applications with it: Serve's own shutdown first would
    wait out every replica's graceful stop, about half a minute)."""
    if not run.get("started_ray"):
        try:
            serve_client(run["dashboard_url"]).delete_applications()
        except Exception as error:  # the cluster may already be gone
            print(f"could not delete the Serve applications: {error}", file=sys.stderr)
        return
    if run.get("ray_session_dir") and run.get("ray_port"):
        stop_ray_session(run["ray_session_dir"], int(run["ray_port"]))
    else:  # a run file from before sessions were recorded
        subprocess.run([ray_executable(), "stop"], capture_output=True)
    if run.get("haproxy_link"):
        Path(run["haproxy_link"]).unlink(missing_ok=True)


def command_up(args: argparse.Namespace) -> int:
    layout = _layout()
    layout.root.mkdir(parents=True, exist_ok=True)
    if layout.run_file.exists():
        raise CommandError(
            f"mediagate already runs from {layout.root} (run `mediagate down` first, "
            f"or remove {layout.run_file} if it died)"
        )
    if args.ingress and args.address:
        raise CommandError(
            "--ingress applies to the Ray instance `mediagate up` starts; start an existing "
            "cluster's nodes with "
            + " ".join(
                f"{name}={value}"
                for name, value in {
                    **SERVE_THROUGHPUT_ENVIRONMENT,
                    **WORKER_PRIORITY_ENVIRONMENT,
                }.items()
            )
            + " for the HAProxy ingress (cluster.yaml does)"
        )
    if args.host in WILDCARD_HOSTS and not args.public_url:
        print(
            f"warning: serving on {args.host} but download URLs will name "
            f"{_local_url(args.host, args.port)}, which other machines cannot reach; "
            "give --public-url http://HOST:PORT (the address clients use)",
            file=sys.stderr,
        )
    config = effective_config(args.config, args.host, args.port, layout.root, args.public_url)
    layout.serve_config.write_text(yaml.safe_dump(config, sort_keys=False))
    started_ray = args.address is None
    run: dict[str, Any] = {"dashboard_url": args.address, "started_ray": started_ray}
    if started_ray:
        ports = LocalRayPorts.choose(
            gcs=args.ray_port,
            dashboard=args.dashboard_port,
            haproxy_stats=args.haproxy_stats_port,
            haproxy_metrics=args.haproxy_metrics_port,
            metrics=args.metrics_port,
        )
        run["dashboard_url"] = _start_ray(args, layout, ports)
        # The session `ray start` just made, so that `down` stops only it.
        run["ray_session_dir"] = str((ray_temp_dir() / "session_latest").resolve())
        run["ray_port"] = ports.gcs
        run["ports"] = ports.as_dict()
        run["ingress"] = args.ingress or DEFAULT_INGRESS
        link = haproxy_link(layout)
        if link is not None and run["ingress"] == "haproxy":
            run["haproxy_link"] = str(link)
    dashboard_url = run["dashboard_url"]
    base_url = _local_url(args.host, args.port)
    try:
        client = serve_client(dashboard_url)
        print(f"deploying {layout.serve_config}", file=sys.stderr)
        client.deploy_applications(config)
        _wait_until_ready(client, base_url, args.ready_timeout_s)
    except BaseException:
        _stop(run)
        raise
    layout.run_file.write_text(json.dumps({**run, "base_url": base_url}))
    print(f"mediagate is serving; OpenAI base URL: {base_url}/v1", file=sys.stderr)
    print(
        f"web console: {base_url}/ (sign in with a key from `mediagate keys create`); "
        f"operations view: {base_url}/ops (operator keys)",
        file=sys.stderr,
    )
    note = provenance_note(config, layout)
    if note:
        print(note, file=sys.stderr)
    if "ports" in run:
        print(
            f"Prometheus metrics: http://{LOOPBACK}:{run['ports']['metrics']}/metrics "
            "(scrape config: deploy/prometheus/prometheus.yml)",
            file=sys.stderr,
        )
    print(f"{base_url}/v1")
    sys.stdout.flush()
    if args.detach:
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            if not layout.run_file.exists():  # `mediagate down` from another terminal
                print("mediagate was stopped by `mediagate down`", file=sys.stderr)
                return 0
    except KeyboardInterrupt:
        pass
    print("shutting down", file=sys.stderr)
    _stop(run)
    layout.run_file.unlink(missing_ok=True)
    return 0


def command_down(_: argparse.Namespace) -> int:
    layout = _layout()
    if not layout.run_file.exists():
        raise CommandError(f"no running mediagate found under {layout.root}")
    _stop(json.loads(layout.run_file.read_text()))
    layout.run_file.unlink(missing_ok=True)
    print("mediagate stopped", file=sys.stderr)
    return 0


def provenance_note(config: dict[str, Any], layout: HomeLayout) -> str | None:
    """What `up` says about the certificate outputs are signed with, when it is the
    local test one (made here, once, so the message can name it)."""
    for app in config.get("applications", []):
        provenance = (app.get("args") or {}).get("provenance") or {}
        if provenance.get("enabled", True) and not provenance.get("certificate_chain"):
            files = ensure_local_certificate(layout.secrets)
            return (
                f"outputs are signed (C2PA) with a local test certificate ({files.chain}): "
                "readers report it as untrusted; give your own in args.provenance "
                "(certificate_chain, private_key)"
            )
    return None
