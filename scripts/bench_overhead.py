"""Serving overhead and batching efficiency on the tiny model, measured in one run.

1. Bare pipeline: the tiny Stable-Diffusion pipeline called directly inside a Ray
   actor (one torch thread, like the worker replica, and the same process
   environment): one 64x64 image, then throughput at batch 1 and B.
2. Served: the same model through HTTP -> HAProxy (or Serve's proxy) -> router -> scheduler ->
   worker on a local Ray instance: sequential single-image latency, then throughput
   with enough concurrent clients to fill batches of 1 and of B.

The two are measured interleaved, not one after the other: a bare call, then a served
request, then the other way round, and throughput in alternating blocks. A 2-core
virtual machine's speed drifts by tens of percent within minutes (the same pipeline
took 130-185 ms per image in three runs of one afternoon); measured in sequence, that
drift landed on one side of every ratio. The bare actor reserves no CPU in Ray (it
sets one torch thread itself) so that it lives beside the served worker; only one of
the two computes at any moment.

Prints a human summary and, on its last line, one JSON object with the ratios, the
absolute overhead at p50 (served - bare, in ms) and the served requests' split by stage
(the medians of their ``Server-Timing`` stages, mediagate.protocol.timing; ``ingress``
is what the client waited beyond them). ``--ingress`` picks the request path as
`mediagate up` does (HAProxy by default).
Quotas are off (the shipped tiers without limits): the figures are the serving path's.
Usage: python scripts/bench_overhead.py [--requests 50] [--batch 4] [--ingress ...] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from benchmarking import (
    add_checks_argument,
    add_ingress_argument,
    checks_off,
    percentile,
    stages_seen_by_client,
    start_local_serve,
    write_tiers_without_quotas,
)

STEPS = 4
SIZE = 64
PROMPT = "a lighthouse at dusk"


class BarePipeline:
    """Runs in a Ray actor with num_cpus=1, like a TextToImage replica."""

    def __init__(self, home: str) -> None:
        import torch

        from models.catalog import load_catalog
        from models.loading import load_pipeline

        torch.set_num_threads(1)
        self.pipeline = load_pipeline(
            load_catalog().models["tiny-sd"], cache_dir=Path(home) / "models"
        )

    def warm_up(self) -> None:
        for seed in range(3):
            bare_call(self.pipeline, 1, seed)

    def one(self, seed: int) -> float:
        """One image; the seconds the pipeline took."""
        started = time.perf_counter()
        bare_call(self.pipeline, 1, seed)
        return time.perf_counter() - started

    def throughput(self, batch: int, images: int) -> tuple[int, float]:
        """Images made in calls of ``batch``, and the seconds it took."""
        calls = max(1, images // batch)
        started = time.perf_counter()
        for seed in range(calls):
            bare_call(self.pipeline, batch, seed)
        return calls * batch, time.perf_counter() - started


def bare_call(pipeline: Any, batch: int, seed: int) -> None:
    import torch

    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    pipeline(
        prompt=[PROMPT] * batch,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=generators,
        output_type="pil",
    )


def catalog_with_batch(home: Path, batch: int) -> Path:
    from importlib import resources

    data = yaml.safe_load(resources.files("models").joinpath("catalog.yaml").read_text())
    data["models"]["tiny-sd"]["batching"] = {"max_batch_size": batch, "batch_wait_s": 0.0}
    path = home / f"catalog-b{batch}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def deploy(home: Path, batch: int, *, without_checks: bool = False) -> None:
    from ray import serve

    from deployments.app import AppArgs, build_app

    args = AppArgs(
        home=str(home),
        catalog=str(catalog_with_batch(home, batch)),
        models=["tiny-sd"],
        tiers_file=str(write_tiers_without_quotas(home)),
        worker_ray_actor_options={"num_cpus": 1, "num_gpus": 0},
        **checks_off(without_checks),
    )
    serve.run(build_app(args), name="mediagate", route_prefix="/")


def post(client: httpx.Client, seed: int) -> httpx.Response:
    response = client.post(
        "/v1/images/generations",
        json={
            "prompt": PROMPT,
            "size": f"{SIZE}x{SIZE}",
            "seed": seed,
            "num_inference_steps": STEPS,
        },
    )
    response.raise_for_status()
    return response


def interleaved_latency(base_url: str, key: str, actor: Any, requests: int) -> dict[str, Any]:
    """Sequential single images, a bare call and a served request in turn (alternating
    which goes first): both latencies, and the median of each stage the served answers
    report in ``Server-Timing`` (``ingress``: what the client waited beyond the router's
    stages, the HTTP ingress and the network)."""
    import ray

    from mediagate.protocol.timing import STAGES

    headers = {"Authorization": f"Bearer {key}"}
    bare: list[float] = []
    served: list[float] = []
    stages: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "ingress")}
    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as client:
        ray.get(actor.warm_up.remote())
        for seed in range(3):
            post(client, seed)

        def one_served(seed: int) -> None:
            started = time.perf_counter()
            response = post(client, seed)
            latency = time.perf_counter() - started
            served.append(latency)
            seen = stages_seen_by_client(response.headers.get("server-timing", ""), latency)
            for stage, value in seen.items():
                stages.setdefault(stage, []).append(value)

        for seed in range(requests):
            if seed % 2:
                one_served(seed)
                bare.append(ray.get(actor.one.remote(seed)))
            else:
                bare.append(ray.get(actor.one.remote(seed)))
                one_served(seed)
    return {
        "bare_p50_s": statistics.median(bare),
        "bare_p99_s": percentile(bare, 99),
        "p50_s": statistics.median(served),
        "p99_s": percentile(served, 99),
        "split_ms": {
            stage: round(statistics.median(values), 2) for stage, values in stages.items() if values
        },
    }


def interleaved_throughput(
    base_url: str, key: str, actor: Any, batch: int, images: int, concurrency: int
) -> tuple[float, float]:
    """Images per second, bare and served, in alternating blocks of half the images."""
    import ray

    bare_images = bare_s = served_s = 0.0
    for _ in range(2):
        made, took = ray.get(actor.throughput.remote(batch, images // 2))
        bare_images, bare_s = bare_images + made, bare_s + took
        served_s += (images // 2) / served_throughput(base_url, key, images // 2, concurrency)
    return bare_images / bare_s, 2 * (images // 2) / served_s


def served_throughput(base_url: str, key: str, total: int, concurrency: int) -> float:
    headers = {"Authorization": f"Bearer {key}"}
    remaining = list(range(total))
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=120) as client:
            while True:
                with lock:
                    if not remaining:
                        return
                    seed = remaining.pop()
                post(client, seed)

    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as warm:
        post(warm, 0)
    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    add_ingress_argument(parser)
    add_checks_argument(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="a few requests: checks the script runs (the suite)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.batch = 3, 2

    import ray

    from mediagate.access.accounts import SqliteAccountStore
    from mediagate.cli.service import stop_own_ray

    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        port = start_local_serve(home, args.ingress)
        # Ray types this handle as `ActorHandle | type[BarePipeline]`, whose methods are
        # plain functions without `.remote`: hold it untyped and type the result instead.
        actor: Any = ray.remote(num_cpus=0)(BarePipeline).remote(str(home))
        store = SqliteAccountStore(home / "state.db")
        key = store.create_key(store.ensure_account("bench", "pro").id)
        base_url = f"http://127.0.0.1:{port}"

        deploy(home, 1, without_checks=args.without_checks)
        served = interleaved_latency(base_url, key, actor, args.requests)
        bare = {"p50_s": served.pop("bare_p50_s"), "p99_s": served.pop("bare_p99_s")}
        bare["throughput_b1"], served["throughput_b1"] = interleaved_throughput(
            base_url, key, actor, 1, args.requests, concurrency=2
        )
        deploy(home, args.batch, without_checks=args.without_checks)
        batch_key = f"throughput_b{args.batch}"
        bare[batch_key], served[batch_key] = interleaved_throughput(
            base_url, key, actor, args.batch, 2 * args.requests, concurrency=2 * args.batch
        )
        ray.kill(actor)
        stop_own_ray()

    result = {
        "model": "tiny-sd",
        "ingress": args.ingress,
        "checks": "off" if args.without_checks else "moderation and signing",
        "size": f"{SIZE}x{SIZE}",
        "steps": STEPS,
        "requests": args.requests,
        "bare_p50_s": round(bare["p50_s"], 4),
        "bare_p99_s": round(bare["p99_s"], 4),
        "served_p50_s": round(served["p50_s"], 4),
        "served_p99_s": round(served["p99_s"], 4),
        "p50_ratio": round(served["p50_s"] / bare["p50_s"], 3),
        "p99_ratio": round(served["p99_s"] / bare["p99_s"], 3),
        "overhead_p50_ms": round((served["p50_s"] - bare["p50_s"]) * 1000, 2),
        "served_split_p50_ms": served["split_ms"],
        "bare_images_per_s_b1": round(bare["throughput_b1"], 3),
        "served_images_per_s_b1": round(served["throughput_b1"], 3),
        "throughput_ratio_b1": round(served["throughput_b1"] / bare["throughput_b1"], 3),
        f"bare_images_per_s_b{args.batch}": round(bare[batch_key], 3),
        f"served_images_per_s_b{args.batch}": round(served[batch_key], 3),
        f"throughput_ratio_b{args.batch}": round(served[batch_key] / bare[batch_key], 3),
    }
    for name, value in result.items():
        print(f"{name:>28}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
