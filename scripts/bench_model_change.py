"""What adding a model does to a model already serving (issue 20's check): its p99
latency while `mediagate models add` runs, against its p99 before.

1. `mediagate up` (its own Ray, own ports, a temporary home) serving tiny-sd alone,
   with the shipped tier file's quotas off.
2. Closed-loop clients (``--clients``, one request after another each) ask tiny-sd for
   64x64 images for ``--before-s``: the baseline.
3. `mediagate models add tiny-b --like tiny-sd --gpus 0` while they go on: the new
   application loads and warms up its replica, the router starts routing to it. The
   "during" window is the command's run.
4. ``--after-s`` more, then `mediagate down`.

``--gpu-nodes`` emulates the GPU cluster the target is about on this machine's two
cores: the head (Serve's controller, HAProxy, the router, the schedulers, this
script's clients and the command) on core 1; tiny-sd's worker on a node of its own
declaring one fake GPU, pinned to core 0; the added model's worker on a second such
node, pinned to core 1 beside the head (`taskset`: every process a node starts
inherits its core). Each model's compute then has a core of its own, as each has a
GPU of its own on a cluster; the added model's start still competes with the head's
processes that tiny-sd's requests pass through. Several nodes on one machine need
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``, which `mediagate up` never sets: with it, Ray
binds some of its listeners (the dashboard agent's, the nodes' Ray client servers) on
the machine's address rather than loopback, token-checked. Run this mode only on a
machine whose network you trust.

Reported: p50/p99 per window, their ratios during/before, errors, how long the add
took, the CPU seconds each process spent during it (by process title: the new
application's replicas, Serve's build task, the command), and whether tiny-sd's
replicas stayed the same. On a 2-core machine the new
replica's start competes with tiny-sd's for the CPU (on a GPU cluster it starts on
another node): that competition is in the figures. Last line: one JSON object.

Usage: python scripts/bench_model_change.py [--before-s 60] [--after-s 10]
       [--clients 2] [--existing [--name tiny-b] | --gpu-nodes] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from benchmarking import (
    free_port,
    percentile,
    stages_seen_by_client,
    write_tiers_without_quotas,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' config writer
from mediagate.cli.local_ray import (
    LOOPBACK,
    LocalRayPorts,
    haproxy_link,
    local_ray_environment,
    ray_executable,
    ray_start_command,
)
from mediagate.cli.model_cluster import Cluster
from mediagate.cli.service import ray_temp_dir, stop_ray_session
from mediagate.settings import HomeLayout
from tests.integration.conftest import write_tiny_sd_config, write_up_config

MEDIAGATE = str(Path(sys.executable).with_name("mediagate"))
FIRST = ("TextToImage-tiny-sd", "Scheduler-tiny-sd")


class Clients:
    """Closed-loop callers of one model; every answer kept as (sent, seconds, status)."""

    def __init__(self, base_url: str, key: str, model: str, count: int) -> None:
        self.answers: list[tuple[float, float, int]] = []
        self.timings: dict[float, str] = {}  # sent -> the answer's Server-Timing
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(base_url, key, model), daemon=True)
            for _ in range(count)
        ]

    def _run(self, base_url: str, key: str, model: str) -> None:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    answer = client.post(
                        "/v1/images/generations",
                        json={"prompt": "a lighthouse", "model": model, "size": "64x64"},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    status = answer.status_code
                    self.timings[sent] = answer.headers.get("server-timing", "")
                except httpx.HTTPError:
                    status = 0
                self.answers.append((sent, time.monotonic() - sent, status))

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=180)

    def window(self, start: float, end: float) -> dict[str, Any]:
        inside = [(took, status) for sent, took, status in self.answers if start <= sent < end]
        took_ms = [took * 1000 for took, status in inside if status == 200]
        return {
            "requests": len(inside),
            "errors": sum(1 for _, status in inside if status != 200),
            "p50_ms": round(percentile(took_ms, 50), 1),
            "p99_ms": round(percentile(took_ms, 99), 1),
        }

    def slowest(self, start: float, end: float, count: int = 3) -> list[dict[str, Any]]:
        """The ``count`` slowest answers sent in [start, end): when (s after ``start``),
        how long, and their stages (Server-Timing; ``ingress``: the rest)."""
        inside = sorted(
            (answer for answer in self.answers if start <= answer[0] < end), key=lambda a: -a[1]
        )
        found = []
        for sent, took, _ in inside[:count]:
            stages = stages_seen_by_client(self.timings.get(sent, ""), took)
            found.append(
                {
                    "at_s": round(sent - start, 1),
                    "ms": round(took * 1000, 1),
                    "stages_ms": {name: round(ms, 1) for name, ms in stages.items()},
                }
            )
        return found


class CpuByProcess:
    """CPU seconds the machine's processes spend while it runs, per process title (a
    Ray worker's title names what it runs at the time: a replica, a task, IDLE):
    what the add cost, and who paid it. Sampled every ``every_s``; a process's CPU
    between two samples goes to the title it had at the second, and a process started
    meanwhile counts from its start. The command itself is measured apart (its
    children's rusage), not sampled: it may live less than a sample's interval."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.seconds: dict[str, float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._children_before = 0.0

    def _sample(self) -> None:
        import psutil

        for process in psutil.process_iter(["cmdline", "name", "cpu_times", "create_time"]):
            times, created = process.info["cpu_times"], process.info["create_time"]
            title = " ".join(process.info["cmdline"] or [process.info["name"] or "?"])
            if times is None or created is None or "models add" in title:
                continue
            used = times.user + times.system
            key = (process.pid, created)
            before = self._last.get(key, 0.0 if created >= self._started else None)
            self._last[key] = used
            if before is None or used <= before:
                continue
            title = title.split()[0] if title.startswith("ray::") else _program(process.info)
            self.seconds[title] = self.seconds.get(title, 0.0) + used - before

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> CpuByProcess:
        self._sample()  # the baseline
        self._children_before = _children_cpu_s()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds["the `mediagate models add` command"] = (
            _children_cpu_s() - self._children_before
        )

    def busiest(self, count: int = 8) -> dict[str, float]:
        ranked = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:count]
        return {title: round(seconds, 1) for title, seconds in ranked}


def _program(info: dict[str, Any]) -> str:
    """A process's name, or for Python the script it runs (Ray's dashboard, agents)."""
    command = info["cmdline"] or ()
    scripts = [Path(part).name for part in command if part.endswith(".py")]
    if scripts:
        return f"python {scripts[0]}"
    return " ".join(command[:3]) if "-m" in command[1:2] else str(info["name"])


def _children_cpu_s() -> float:
    """CPU seconds of this process's children that have ended (the commands run)."""
    import resource

    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


HEAD_CORE, FIRST_MODEL_CORE = 1, 0
ON_THE_HEAD = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}


def gpu_nodes_config(home: Path, tiers_file: Path) -> Path:
    """tiny-sd alone, its worker on a (fake) GPU node, everything else on the head
    (where serve.gpu.yaml puts it; a model added later places its scheduler beside
    the router)."""
    return write_up_config(
        home / "serve.gpu-nodes.yaml",
        {"models": ["tiny-sd"], "tiers_file": str(tiers_file)},
        [
            {"name": "Router", "ray_actor_options": ON_THE_HEAD},
            {"name": "Webhooks", "ray_actor_options": ON_THE_HEAD},
            {"name": "Scheduler-tiny-sd", "ray_actor_options": ON_THE_HEAD},
            {"name": "TextToImage-tiny-sd", "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}},
        ],
    )


class GpuNodes:
    """The emulated cluster of ``--gpu-nodes``: a head set up as `mediagate up` sets up
    its own (``local_ray_environment``), but open to other nodes, on ``HEAD_CORE``;
    then nodes of one CPU and one fake GPU, each pinned to a core. Stopped as `mediagate
    down` stops its own Ray (the session's processes), with the nodes' `ray start`."""

    def __init__(self, env: dict[str, str], home: Path) -> None:
        layout = HomeLayout(home)
        self.ports = LocalRayPorts.choose(gcs=free_port(), dashboard=free_port())
        self.environment = {
            **env,
            **local_ray_environment(layout, self.ports, "haproxy"),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # several nodes on one machine
        }
        self.haproxy_link = haproxy_link(layout)
        self.dashboard_url = f"http://{LOOPBACK}:{self.ports.dashboard}"
        self.nodes: list[subprocess.Popen[bytes]] = []
        head = [*ray_start_command(ray_executable(), self.ports, 2), "--num-gpus=0"]
        started = subprocess.run(
            ["taskset", "-c", str(HEAD_CORE), *head],
            env=self.environment, capture_output=True, text=True,
        )  # fmt: skip
        if started.returncode != 0:
            raise SystemExit(f"ray start --head failed:\n{started.stderr[-3000:]}")
        self.session_dir = str((ray_temp_dir() / "session_latest").resolve())

    def add_node(self, core: int, nice: int = 0) -> None:
        """A node of one CPU and one fake GPU, every process of it on ``core`` (at
        ``nice``: a node of lower priority stands in for a machine of its own)."""
        node_ports = [
            f"--{name}-port={free_port()}"
            for name in (
                "node-manager", "object-manager", "dashboard-agent-listen",
                "dashboard-agent-grpc", "runtime-env-agent", "metrics-export",
            )
        ]  # fmt: skip
        command = [
            "nice", "-n", str(nice), "taskset", "-c", str(core), ray_executable(), "start",
            f"--address={LOOPBACK}:{self.ports.gcs}", f"--node-ip-address={LOOPBACK}",
            "--num-cpus=1", "--num-gpus=1", *node_ports, "--disable-usage-stats", "--block",
        ]  # fmt: skip
        quiet = subprocess.DEVNULL
        self.nodes.append(
            subprocess.Popen(command, env=self.environment, stdout=quiet, stderr=quiet)
        )

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> None:
        """Until ``count`` nodes are alive (the dashboard's state API)."""
        live = Cluster(self.dashboard_url)
        deadline = time.monotonic() + timeout_s
        while len(live.node_resources()) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"fewer than {count} nodes joined within {timeout_s:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        stop_ray_session(self.session_dir, self.ports.gcs)
        import psutil

        # A node's Ray client server names neither the session nor a parent that lives.
        # (It names the GCS by the machine's address: match the port.)
        gcs = f":{self.ports.gcs}"
        for process in psutil.process_iter(["cmdline"]):
            command = process.info["cmdline"] or ()
            if "ray.util.client.server" in command and any(
                part.startswith("--address=") and part.endswith(gcs) for part in command
            ):
                process.kill()
        if self.haproxy_link is not None:
            self.haproxy_link.unlink(missing_ok=True)


def replica_ids(dashboard_url: str, token: str) -> dict[str, list[str]]:
    details = httpx.get(
        f"{dashboard_url}/api/serve/applications/",
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    found = {
        name: deployment
        for app in details["applications"].values()
        for name, deployment in app["deployments"].items()
    }
    return {
        name: sorted(r["replica_id"] for r in found[name]["replicas"] if r["state"] == "RUNNING")
        for name in FIRST
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-s", type=float, default=60.0)
    parser.add_argument("--after-s", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--existing",
        action="store_true",
        help="use the `mediagate up` of $MEDIAGATE_HOME (it serves tiny-sd, CPUs for one "
        "more replica, RAY_AUTH_TOKEN set) instead of starting one; the added model is "
        "removed again",
    )
    parser.add_argument("--name", default="tiny-b", help="the model to add")
    which.add_argument(
        "--gpu-nodes",
        action="store_true",
        help="each model's worker on a fake GPU node of its own, pinned to a core (above)",
    )
    parser.add_argument(
        "--added-node-nice",
        type=int,
        default=0,
        help="with --gpu-nodes: the added model's node runs at this nice value (19: it takes "
        "core 1 only when the head leaves it, as a machine of its own would)",
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds per window")
    args = parser.parse_args()
    if args.smoke:
        args.before_s, args.after_s, args.clients = 3.0, 1.0, 1
    with tempfile.TemporaryDirectory(prefix="mg-bench-models-") as scratch:
        env = dict(os.environ)
        if not args.existing:
            env |= {"MEDIAGATE_HOME": scratch, "RAY_AUTH_TOKEN": secrets.token_hex(32)}

        def cli(*command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [MEDIAGATE, *command], env=env, capture_output=True, text=True, timeout=900
            )

        home = Path(env["MEDIAGATE_HOME"]).expanduser()
        cluster: GpuNodes | None = None
        if args.gpu_nodes:
            if not {HEAD_CORE, FIRST_MODEL_CORE} <= os.sched_getaffinity(0):
                raise SystemExit("--gpu-nodes needs cores 0 and 1")
            os.sched_setaffinity(0, {HEAD_CORE})  # and so every process started here
            os.environ["RAY_AUTH_TOKEN"] = env["RAY_AUTH_TOKEN"]  # the cluster's, not a file's
            cluster = GpuNodes(env, home)
            cluster.add_node(FIRST_MODEL_CORE)  # tiny-sd's worker waits for it
        if not args.existing:
            tiers = write_tiers_without_quotas(home)
            if cluster is not None:
                where = ["--address", cluster.dashboard_url]
                config = gpu_nodes_config(home, tiers)
            else:
                where = ["--dashboard-port", str(free_port()), "--ray-port", str(free_port())]
                config = write_tiny_sd_config(home, tiers)
            up = cli("up", "--detach", "--port", str(free_port()), "--config", str(config), *where)
            if up.returncode != 0:
                if cluster is not None:
                    cluster.stop()
                raise SystemExit(f"mediagate up failed:\n{up.stderr[-3000:]}")
        run = json.loads((home / "run.json").read_text())
        base_url, dashboard_url = run["base_url"], run["dashboard_url"]
        token = env["RAY_AUTH_TOKEN"]
        try:
            if cluster is not None:  # the node the added model's worker will take
                cluster.add_node(HEAD_CORE, args.added_node_nice)
                cluster.wait_for_nodes(3)
            created = cli("keys", "create", "--tier", "pro", "--account", "bench")
            key = created.stdout.strip().splitlines()[-1]
            before_ids = replica_ids(dashboard_url, token)
            with Clients(base_url, key, "tiny-sd", args.clients) as clients:
                time.sleep(1.0)  # past the first requests' warm-up
                start = time.monotonic()
                time.sleep(args.before_s)
                change_started = time.monotonic()
                with CpuByProcess() as cpu:
                    gpus = "1" if args.gpu_nodes else "0"
                    added = cli("models", "add", args.name, "--like", "tiny-sd", "--gpus", gpus)
                change_ended = time.monotonic()
                time.sleep(args.after_s)
                ended = time.monotonic()
            if added.returncode != 0:
                raise SystemExit(f"models add failed:\n{added.stderr[-3000:]}")
            new_model = httpx.post(
                f"{base_url}/v1/images/generations",
                json={"prompt": "a lighthouse", "model": args.name, "size": "64x64"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=120,
            ).status_code
            after_ids = replica_ids(dashboard_url, token)
        finally:
            if args.existing:
                cli("models", "remove", args.name, "--now")
            elif cluster is not None:
                cluster.stop()  # the applications with it
            else:
                cli("down")
    before = clients.window(start, change_started)
    during = clients.window(change_started, change_ended)
    after = clients.window(change_ended, ended)
    print(
        json.dumps(
            {
                "clients": args.clients,
                "gpu_nodes": args.gpu_nodes,
                "added_node_nice": args.added_node_nice,
                "before": before,
                "during_add": during,
                "after": after,
                "add_s": round(change_ended - change_started, 1),
                "cpu_s_during_add": cpu.busiest(),
                "slowest_during_add": clients.slowest(change_started, change_ended),
                "p99_ratio_during": round(during["p99_ms"] / before["p99_ms"], 3),
                "p50_ratio_during": round(during["p50_ms"] / before["p50_ms"], 3),
                "errors": before["errors"] + during["errors"] + after["errors"],
                "first_model_replicas_unchanged": before_ids == after_ids,
                "new_model_status": new_model,
            }
        )
    )


if __name__ == "__main__":
    main()
