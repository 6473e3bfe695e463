"""A model kept in its node's host memory (deployments/workers/host_memory.py) on the
session's real Ray: the first replica process loads it from files and hands it to the
node's keeper; the next takes it from Ray's object store instead, and makes the same
image, pixel for pixel, as one loaded from files."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.catalog import load_catalog


def _replica(spec: Any, cache_dir: str, through_host_memory: bool) -> Any:
    """A process of its own standing in for a worker replica: loads ``spec`` and makes one
    64x64 image with a fixed seed."""
    import torch

    from deployments.workers.host_memory import load_through_host_memory
    from models.loading import load_pipeline

    torch.set_num_threads(1)
    load = load_through_host_memory if through_host_memory else load_pipeline
    pipeline = load(spec, cache_dir=Path(cache_dir))
    return pipeline(
        prompt="a red barn",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images[0]


def test_the_next_replica_on_a_node_takes_the_pipeline_from_host_memory(
    ray_session: None, tmp_path: Path
) -> None:
    import ray

    from deployments.workers.host_memory import host_key, node_keeper
    from models.device import choose_placement

    spec = (
        load_catalog()
        .models["tiny-sd"]
        .model_copy(update={"version": f"hm-{secrets.token_hex(4)}", "host_memory": True})
    )
    replica = ray.remote(num_cpus=0)(_replica)
    first = ray.get(replica.remote(spec, str(tmp_path), True))
    keeper = node_keeper()
    key = host_key(spec, choose_placement(spec.dtype))

    def kept() -> dict[str, Any]:
        return {kept.key: kept for kept in ray.get(keeper.held.remote())}

    # The first replica hands its pipeline over without waiting for the keeper.
    deadline = time.monotonic() + 60
    while key not in kept() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kept()[key].taken == 0 and kept()[key].size_bytes > 1_000_000
    second = ray.get(replica.remote(spec, str(tmp_path), True))
    assert kept()[key].taken == 1  # from host memory, not files
    from_files = ray.get(replica.remote(spec, str(tmp_path), False))
    assert np.array_equal(first, from_files) and np.array_equal(second, from_files)
    assert ray.get(keeper.forget.remote(key)) is True
