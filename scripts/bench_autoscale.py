"""How fast worker replicas follow the queue, measured in one run.

A SIMULATED image model (it sleeps per denoising step like a GPU replica waits on its
device) is deployed from a config through the Serve REST API, as `mediagate up` does
(the application-level policy only applies to config deployments), on a local Ray
with its dashboard. Worker limits: min 1, max 4, one request per replica.

1. Replica start time: raise min_replicas to max (`mediagate scale set`'s path: the
   same 1 -> max step the burst causes) and time from the applied config until the
   first new replica is RUNNING; then back to 1.
2. Burst: N concurrent requests. The scheduler's queue is watched through
   GET /v1/status; the moment it first exceeds the target is t0. Each answer names
   the worker replica that made it (x-mediagate-worker); the first request that a
   new replica starts marks t1 (its answer time minus its service time).
   ratio = (t1 - t0) / (upscale_delay_s + metrics_interval_s + replica start time).
3. After the last answer: the time until the deployment is back at min, against
   downscale_delay_s.

Prints a summary and, on its last line, one JSON object.
Usage: python scripts/bench_autoscale.py [--burst 16] [--steps 10] [--step-ms 100] [--smoke]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from benchmarking import free_port, write_tiers_without_quotas

WORKER = "TextToImage-sim"


def write_config(home: Path, args: argparse.Namespace, port: int) -> dict[str, Any]:
    catalog = {
        "default_models": {"text-to-image": "sim"},
        "models": {
            "sim": {
                "task": "text-to-image",
                "description": "SIMULATED model for the autoscaling benchmark: sleeps per step.",
                "source": f"simulated://sim?step_ms={args.step_ms}",
                "num_gpus": 0,
                "defaults": {"size": "64x64", "num_inference_steps": args.steps},
                "caps": {"max_width": 64, "max_height": 64, "max_steps": args.steps, "max_n": 1},
                "batching": {"max_batch_size": 1, "batch_wait_s": 0.0},
            }
        },
    }
    (home / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    tiers_file = write_tiers_without_quotas(home)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "mediagate",
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                "autoscaling_policy": {"policy_function": "autoscaling.policy:scale_workers"},
                "args": {
                    "home": str(home),
                    "catalog": str(home / "catalog.yaml"),
                    "tiers_file": str(tiers_file),
                },
                "deployments": [
                    {
                        "name": WORKER,
                        "ray_actor_options": {"num_cpus": 0, "num_gpus": 0},
                        "autoscaling_config": {
                            "min_replicas": 1,
                            "max_replicas": args.max_replicas,
                            "target_ongoing_requests": 1,
                            "upscale_delay_s": args.upscale_delay_s,
                            "downscale_delay_s": args.downscale_delay_s,
                            "metrics_interval_s": args.metrics_interval_s,
                            "look_back_period_s": 1.0,
                        },
                    }
                ],
            }
        ],
    }


class Service:
    def __init__(self, client: Any, config: dict[str, Any], base_url: str, key: str) -> None:
        self.client = client
        self.config = config
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {key}"}

    def running(self) -> list[str]:
        details = self.client.get_serve_details()
        replicas = details["applications"]["mediagate"]["deployments"][WORKER]["replicas"]
        return [r["replica_id"] for r in replicas if r["state"] == "RUNNING"]

    def wait_until(self, condition: Any, timeout_s: float = 120) -> float:
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError("the deployment did not reach the expected size")
            time.sleep(0.2)
        return time.monotonic()

    def set_min(self, replicas: int) -> None:
        [app] = self.config["applications"]
        app["deployments"][0]["autoscaling_config"]["min_replicas"] = replicas
        self.client.deploy_applications(self.config)

    def scheduler_view(self) -> tuple[float, int]:
        """The scheduler's queue length and the worker replicas it dispatches to."""
        status = httpx.get(f"{self.base_url}/v1/status", headers=self.headers, timeout=10).json()
        model = status["models"]["sim"]
        return float(model["queue_len"]), int(model["replicas"])

    def image(self) -> tuple[float, str]:
        answer = httpx.post(
            f"{self.base_url}/v1/images/generations",
            json={"prompt": "burst", "model": "sim"},
            headers=self.headers,
            timeout=300,
        )
        answer.raise_for_status()
        return time.monotonic(), answer.headers["x-mediagate-worker"]


def measure(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    service_s = args.steps * args.step_ms / 1000
    # 1. Replica start time, through the same lightweight update `mediagate scale set`
    # makes, for the same step the burst will ask for (1 -> max at once: on two cores
    # replicas that start together start slower than one alone).
    service.set_min(args.max_replicas)
    asked = time.monotonic()  # the config is applied: from here on it is replica start
    started = service.wait_until(lambda: len(service.running()) >= 2)
    replica_start_s = started - asked
    service.set_min(1)
    service.wait_until(lambda: len(service.running()) == 1)
    _, first_worker = service.image()
    time.sleep(3)  # let the metrics settle at an empty queue

    # 2. The burst, with the queue watched from the side.
    exceeded: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not scheduler_saw_more:
            queued, replicas = service.scheduler_view()
            if queued > 1 and not exceeded:  # target: one request per replica
                exceeded.append(time.monotonic())
                exceeded_wall.append(time.time())
            if replicas > 1:
                scheduler_saw_more.append(time.monotonic())
            time.sleep(0.1)

    scheduler_saw_more: list[float] = []

    exceeded_wall: list[float] = []

    watcher = threading.Thread(target=watch)
    watcher.start()
    sent = time.monotonic()
    peak = [1]

    def follow() -> None:
        while not stop.is_set():
            running = len(service.running())
            if running > 1 and not running_more:
                running_more.append(time.monotonic())
            peak[0] = max(peak[0], running)
            time.sleep(0.2)  # the dashboard's details are heavy: poll gently

    running_more: list[float] = []

    follower = threading.Thread(target=follow)
    follower.start()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.burst) as pool:
        answers = list(pool.map(lambda _: service.image(), range(args.burst)))
    last_answer = time.monotonic()
    stop.set()
    watcher.join()
    follower.join()
    t0 = exceeded[0] if exceeded else sent
    new_starts = [done - service_s for done, worker in answers if worker != first_worker]
    t1 = min(new_starts) if new_starts else float("nan")

    # Where the time went: when the controller created the first new replica (its
    # actor's start time) is when the scale-up was decided.
    details = service.client.get_serve_details()["applications"]["mediagate"]["deployments"]
    created = [
        replica["start_time_s"]
        for replica in details[WORKER]["replicas"] + details[WORKER].get("recent_dead_replicas", [])
        if replica["replica_id"] != first_worker and replica.get("start_time_s")
    ]
    wall0 = exceeded_wall[0] if exceeded_wall else float("nan")
    decided_after_s = min((t for t in created if t >= wall0 - 1), default=float("nan")) - wall0

    # 3. Back to min after the load stops.
    back = service.wait_until(lambda: len(service.running()) == 1, timeout_s=300)
    configured_up = args.upscale_delay_s + args.metrics_interval_s
    expected_s = configured_up + replica_start_s
    return {
        "model": f"simulated {args.steps} steps x {args.step_ms:g} ms (batch 1)",
        "burst_requests": args.burst,
        "replica_start_s": round(replica_start_s, 2),
        "upscale_delay_s": args.upscale_delay_s,
        "metrics_interval_s": args.metrics_interval_s,
        "queue_exceeded_after_send_s": round(t0 - sent, 3),
        "decision_after_s": round(decided_after_s, 2),
        "new_replica_running_s": round(running_more[0] - t0, 2) if running_more else None,
        "scheduler_saw_it_s": round(scheduler_saw_more[0] - t0, 2) if scheduler_saw_more else None,
        "first_new_replica_start_s": round(t1 - t0, 2),
        "expected_s": round(expected_s, 2),
        "scale_up_ratio": round((t1 - t0) / expected_s, 3),
        "peak_replicas": peak[0],
        "workers_used": len({worker for _, worker in answers}),
        "burst_s": round(last_answer - sent, 2),
        "burst_s_on_one_replica": round(args.burst * service_s, 2),
        "downscale_delay_s": args.downscale_delay_s,
        "back_to_min_s": round(back - last_answer, 2),
        "scale_down_ratio": round((back - last_answer) / args.downscale_delay_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-ms", type=float, default=100)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--upscale-delay-s", type=float, default=1.0)
    parser.add_argument("--downscale-delay-s", type=float, default=5.0)
    parser.add_argument("--metrics-interval-s", type=float, default=0.5)
    parser.add_argument(
        "--smoke", action="store_true", help="a small burst to 2 replicas: checks the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.burst, args.steps, args.step_ms = 20, 4, 100
        args.max_replicas, args.downscale_delay_s = 2, 2.0

    import ray

    from mediagate.access.accounts import SqliteAccountStore
    from mediagate.cli.service import serve_client

    dashboard_port, port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            log_to_driver=False,
        )
        try:
            client = serve_client(f"http://127.0.0.1:{dashboard_port}")
            config = write_config(home, args, port)
            client.deploy_applications(config)
            store = SqliteAccountStore(home / "state.db")
            key = store.create_key(store.ensure_account("bench", "pro").id)
            service = Service(client, config, f"http://127.0.0.1:{port}", key)
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{service.base_url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("the service did not come up")
                time.sleep(0.5)
            result = measure(service, args)
            client.delete_applications()
        finally:
            ray.shutdown()
    for name, value in result.items():
        print(f"{name:>28}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
