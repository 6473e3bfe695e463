"""How long a worker replica takes to be ready, by where its weights come from.

A replica is ready when its constructor returns: weights resolved (fetched when
remote), the pipeline loaded with ``from_pretrained`` and moved to its device, the edit
pipelines built from it, and one warm-up generation run. Measured here by building the
real ``TextToImage`` worker class in this process (no Ray), for the tiny models:

- remote: the weights in S3 (moto's server, a real HTTP endpoint), the node's model
  cache empty: the replica downloads them (once per node: a file lock and an atomic
  rename share them with the node's other replicas);
- disk: the same weights already in the node's model cache (what every further replica
  of that node, and every restart, finds);
- memory: the model kept in the node's host memory (the catalog's ``host_memory``:
  Ray's object store, held by the node's keeper actor, deployments/workers/host_memory.py),
  as every replica after the first on that node finds it; this process is a driver of a
  local Ray instance for all three modes.

Each mode runs ``--repeats`` times (remote: a fresh cache each time); imports happen
once, before any timing, as they do before a replica's constructor. Besides the whole
ready time, the load alone (files or host memory, to the device; no edit pipelines, no
warm-up) is timed. Last line: one JSON object with the medians and the ratios per
model.

Usage: python scripts/bench_cold_start.py [--repeats 5] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchmarking import start_local_ray

from deployments.workers.host_memory import host_key, load_through_host_memory, node_keeper
from deployments.workers.text_to_image import TextToImage
from mediagate.cli.service import stop_own_ray
from models.catalog import load_catalog
from models.device import choose_placement
from models.loading import load_pipeline
from models.tiny import ensure_tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers: moto's server
from tests.servers import MOTO_CREDENTIALS, moto_s3_server

BUCKET = "weights"
TINY_SOURCES = {"tiny-sd": "stable-diffusion", "tiny-sdxl": "stable-diffusion-xl"}


def upload(client: Any, directory: Path, prefix: str) -> int:
    count = 0
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(directory)}")
            count += 1
    return count


def ready_s(spec: Any, cache_dir: Path) -> float:
    started = time.perf_counter()
    TextToImage(spec, cache_dir=str(cache_dir), torch_threads=1)
    return time.perf_counter() - started


def load_s(load: Any, spec: Any, cache_dir: Path) -> float:
    started = time.perf_counter()
    load(spec, cache_dir=cache_dir)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="one model, one repeat")
    args = parser.parse_args()
    models = ["tiny-sd"] if args.smoke else list(TINY_SOURCES)
    repeats = 1 if args.smoke else args.repeats
    os.environ.update(MOTO_CREDENTIALS)
    with tempfile.TemporaryDirectory(prefix="mg-cold-") as scratch, moto_s3_server() as s3:
        start_local_ray(Path(scratch), "serve-proxy")
        try:
            results = measure(models, repeats, s3, Path(scratch))
        finally:
            stop_own_ray()
    print(json.dumps({"repeats": repeats, "models": results}))


def measure(models: list[str], repeats: int, s3: Any, root: Path) -> dict[str, Any]:
    """Every mode's ready times for ``models``, their weights put in ``s3`` (moto)."""
    torch.set_num_threads(1)
    os.environ["MEDIAGATE_S3_ENDPOINT_URL"] = s3.endpoint_url
    client: Any = s3.client()
    client.create_bucket(Bucket=BUCKET)
    base = load_catalog().models["tiny-sd"]
    results: dict[str, Any] = {}
    for model in models:
        built = ensure_tiny_pipeline(TINY_SOURCES[model], root / "built")
        files = upload(client, built, model)
        size = sum(path.stat().st_size for path in built.rglob("*") if path.is_file())
        pipeline_class = "StableDiffusionXLPipeline" if "xl" in model else base.pipeline_class
        spec = base.model_copy(
            update={
                "id": model,
                "source": f"s3://{BUCKET}/{model}",
                "pipeline_class": pipeline_class,
                "tasks": ["text-to-image"],
            }
        )
        ready_s(spec, root / "warm")  # imports and lazy initialisation, untimed
        remote = [ready_s(spec, root / f"cache-{model}-{n}") for n in range(repeats)]
        cache = root / f"cache-{model}-0"
        disk = [ready_s(spec, cache) for _ in range(repeats)]
        kept = spec.model_copy(update={"host_memory": True})
        first = ready_s(kept, cache)  # the first replica on the node: files, then handed over
        wait_until_kept(kept)
        memory = [ready_s(kept, cache) for _ in range(repeats)]
        disk_load = [load_s(load_pipeline, spec, cache) for _ in range(repeats)]
        memory_load = [load_s(load_through_host_memory, kept, cache) for _ in range(repeats)]
        results[model] = {
            "files": files,
            "megabytes": round(size / 1e6, 2),
            "remote_s": median(remote),
            "disk_s": median(disk),
            "memory_s": median(memory),
            "first_with_host_memory_s": round(first, 3),
            "disk_over_remote": round(median(disk) / median(remote), 3),
            "memory_over_disk": round(median(memory) / median(disk), 3),
            "memory_over_remote": round(median(memory) / median(remote), 3),
            "load_only_disk_s": median(disk_load),
            "load_only_memory_s": median(memory_load),
            "load_only_memory_over_disk": round(median(memory_load) / median(disk_load), 3),
        }
    return results


def wait_until_kept(spec: Any, timeout_s: float = 60.0) -> None:
    """Until the node's keeper holds ``spec`` (the first replica does not wait for it)."""
    import ray

    key = host_key(spec, choose_placement(spec.dtype))
    deadline = time.monotonic() + timeout_s
    while key not in {kept.key for kept in ray.get(node_keeper().held.remote())}:
        if time.monotonic() > deadline:
            raise SystemExit(f"{spec.id} was not kept within {timeout_s:.0f} s")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
