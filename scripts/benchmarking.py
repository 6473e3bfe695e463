"""What every benchmark script shares: percentiles, free ports, and the tier file that
takes quotas out of the way (a benchmark measures the serving path, not the quotas).

The scripts import it by name (a script's own folder is on ``sys.path`` when it runs).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mediagate.access.tiers import shipped_tier_config
from mediagate.cli.local_ray import free_port as free_port  # one definition, re-exported

if TYPE_CHECKING:
    from mediagate.cli.local_ray import Ingress


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def stages_seen_by_client(server_timing: str, latency_s: float) -> dict[str, float]:
    """A response's ``Server-Timing`` stages (ms), and ``ingress``: the rest of the time
    its client waited, outside every stage the router reported."""
    from mediagate.protocol.timing import parse_server_timing

    stages = parse_server_timing(server_timing)
    stages["ingress"] = latency_s * 1000 - sum(stages.values())
    return stages


def write_tiers_without_quotas(home: Path) -> Path:
    """The shipped tiers without daily quotas, rates, cooldowns and queue caps: with
    them, a pro key gets 429 after 60 images a minute and the figures measure the quota."""
    data = shipped_tier_config()
    for tier in data["tiers"].values():
        tier.update(images_per_day=None, images_per_minute=None, cooldown=None, max_queued=None)
    path = home / "tiers.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def add_ingress_argument(parser: argparse.ArgumentParser) -> None:
    from mediagate.cli.local_ray import DEFAULT_INGRESS, INGRESSES

    parser.add_argument(
        "--ingress",
        choices=INGRESSES,
        default=DEFAULT_INGRESS,
        help="the request path `mediagate up` starts (haproxy, its default) or Ray Serve's "
        "Python proxy (serve-proxy)",
    )


def add_checks_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--without-checks",
        action="store_true",
        help="serve without the per-image moderation check and C2PA signing (both on by "
        "default; scripts/bench_safety.py measures what they cost)",
    )


def checks_off(without: bool) -> dict[str, Any]:
    """AppArgs fields that switch the per-image checks off, if asked."""
    if not without:
        return {}
    return {"moderation": {"enabled": False}, "provenance": {"enabled": False}}


def start_local_ray(home: Path, ingress: Ingress) -> None:
    """A local Ray instance set up as `mediagate up` sets up its own (token auth,
    loopback listeners, the chosen ingress), with this process as its driver."""
    import os

    import ray

    from mediagate.cli.local_ray import LOOPBACK, LocalRayPorts, local_ray_environment
    from mediagate.settings import HomeLayout

    ports = LocalRayPorts.choose(gcs=free_port(), dashboard=free_port())
    # Read by the processes ray.init starts (they inherit this environment).
    os.environ.update(local_ray_environment(HomeLayout(home), ports, ingress))
    # This process read RAY_AUTH_MODE when it imported Ray: have it read it again, as
    # Ray's own `ray.init()` does when it turns token authentication on.
    # (Read by name: the compiled module's stubs do not always list it.)
    importlib.import_module("ray._raylet").Config.initialize("")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address=LOOPBACK,
    )


def start_local_serve(home: Path, ingress: Ingress) -> int:
    """``start_local_ray``, then Serve on a free loopback HTTP port; returns the port."""
    from ray import serve

    start_local_ray(home, ingress)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def actor_pids(app: str, deployments: list[str]) -> dict[str, int]:
    """The process id of one live replica of each of ``deployments`` in ``app``."""
    import os

    import ray

    pids: dict[str, int] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        for name in deployments:
            if f"{app}#{name}#" in actor["name"]:
                # Ray types attributes of a handle without `@ray.method` (even the built-in
                # `__ray_call__`) as `Never`: hold it untyped.
                handle: Any = ray.get_actor(actor["name"], namespace=actor["namespace"])
                pids[name] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    return pids
