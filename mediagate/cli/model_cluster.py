"""The cluster as `mediagate models` drives it: the Serve REST API (the deployed config,
application states, deploys) and the dashboard's node list, with the waits a model
change needs, and one change at a time per home."""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from autoscaling.limits import deployed_config
from autoscaling.naming import worker_name
from mediagate.cli.command import CommandError, _layout
from mediagate.cli.service import ray_auth_headers, serve_client
from mediagate.protocol.catalog import ModelSpec

POLL_S = 0.5
FAILED_STATUSES = ("DEPLOY_FAILED", "UNHEALTHY")


@contextlib.contextmanager
def one_change_at_a_time() -> Iterator[None]:
    """Hold the home's model-change lock: two changes interleaved would each deploy a
    config the other did not see."""
    layout = _layout()
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.root / ".models.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CommandError(
                "another `mediagate models` change is running; wait for it"
            ) from None
        yield


class Cluster:
    """The Serve REST API of one cluster, as the model commands use it."""

    def __init__(self, dashboard_url: str) -> None:
        self.dashboard_url = dashboard_url
        self.client = serve_client(dashboard_url)

    def config(self) -> dict[str, Any]:
        return deployed_config(self.client.get_serve_details())

    def apply(self, config: dict[str, Any]) -> None:
        """Deploy ``config`` and keep $MEDIAGATE_HOME/serve.yaml the same (a later
        `serve deploy` of that file must not undo a model change)."""
        self.client.deploy_applications(config)
        serve_config = _layout().serve_config
        if serve_config.exists():
            serve_config.write_text(yaml.safe_dump(config, sort_keys=False))

    def change(self, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Apply ``edit`` to the config deployed now (read again: a `scale set` made
        meanwhile stays) and deploy the result."""
        changed = edit(self.config())
        self.apply(changed)
        return changed

    def worker_limits(self, application: str, spec: ModelSpec) -> dict[str, Any]:
        """The deployed autoscaling numbers of ``application``'s worker."""
        app = self.applications().get(application) or {}
        deployment = (app.get("deployments") or {}).get(worker_name(spec.task, spec.id)) or {}
        return dict((deployment.get("deployment_config") or {}).get("autoscaling_config") or {})

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

    def delete(
        self,
        edit: Callable[[dict[str, Any]], dict[str, Any]],
        application: str,
        timeout_s: float = 120.0,
    ) -> None:
        """Deploy ``edit`` of the current config (which leaves ``application`` out) and
        wait until Serve has stopped that application's replicas and forgotten it."""
        started = time.monotonic()
        self.change(edit)
        while application in self.applications():
            if time.monotonic() - started > timeout_s:
                print(f"warning: {application} is still being deleted", file=sys.stderr)
                return
            time.sleep(POLL_S)
        print(f"{application} deleted in {time.monotonic() - started:.1f}s", file=sys.stderr)

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
