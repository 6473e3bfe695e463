"""`mediagate scale show` and `scale set`: read and change a model's autoscaling limits
live, audited (mediagate.cli.audit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from autoscaling.limits import ScaleChange, ScaleError, changed_deployment, scale_rows
from autoscaling.naming import ROUTER
from mediagate.access.tiers import load_tier_policy, parse_tier_policy
from mediagate.cli.accounts import _policy
from mediagate.cli.audit import recent_lines, record
from mediagate.cli.command import CommandError, _layout
from mediagate.cli.service import DEFAULT_DASHBOARD_PORT, serve_client


def _dashboard_url(address: str | None) -> str:
    """--address, else the cluster `mediagate up` started (its run file)."""
    if address:
        return address
    layout = _layout()
    if layout.run_file.exists():
        return str(json.loads(layout.run_file.read_text())["dashboard_url"])
    return f"http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}"


def deployed_free_class(deployments: dict[str, Any]) -> int:
    """The lowest priority class of the tier policy the deployed routers use (their
    ``user_config``: inline ``tiers`` or a ``tiers_file``), not of a local tier file that
    may differ. A file the routers read but this machine cannot falls back to the local
    policy, with a warning."""
    router = deployments.get(ROUTER) or {}
    user_config = (router.get("deployment_config") or {}).get("user_config") or {}
    if user_config.get("tiers"):
        policy = parse_tier_policy(user_config["tiers"])
    elif user_config.get("tiers_file"):
        try:
            policy = load_tier_policy(user_config["tiers_file"])
        except OSError as error:
            print(
                f"warning: the deployed tier file is not readable here ({error}); "
                "using the local tier policy",
                file=sys.stderr,
            )
            policy = _policy()
    else:
        policy = load_tier_policy()
    return policy.lowest_priority_class


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
    for line in recent_lines(args.history):
        print(line)
    return 0


def command_scale_set(args: argparse.Namespace) -> int:
    client = serve_client(_dashboard_url(args.address))
    details = client.get_serve_details()
    deployments = ((details.get("applications") or {}).get(args.app) or {}).get("deployments") or {}
    change = ScaleChange(
        model=args.model,
        min_replicas=args.min,
        max_replicas=args.max,
        target=args.target,
        free_weight=args.free_weight,
        allow_zero_images=args.allow_zero,
    )
    try:
        updated, lines = changed_deployment(
            details, args.app, change, free_class=deployed_free_class(deployments)
        )
    except ScaleError as error:
        raise CommandError(str(error)) from error
    if not lines:
        print("nothing changed: the deployed values are already these")
        return 0
    client.deploy_applications(updated)
    record(lines)
    for line in lines:
        print(line)
    print("applied as a lightweight update: running replicas keep running")
    return 0
