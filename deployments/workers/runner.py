"""What both workers share around a diffusers pipeline: torch's threads, loading and
warming up the model, and stopping the denoising loop at the next step."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.workers.host_memory import load_through_host_memory
from mediagate.protocol.catalog import ModelSpec
from models.device import assigned_cpus
from models.loading import load_pipeline

logger = logging.getLogger(__name__)

PipelineLoader = Callable[..., Any]


class StoppedAtStep(Exception):
    """The denoising loop was ended early (work taken back, or no longer ours)."""


def stop_pipeline(pipeline: Any, step: int) -> None:
    """End the denoising loop now: the interrupt flag makes diffusers skip the remaining
    steps, and the exception skips the VAE decode of output nobody will receive (seconds
    on a real video model)."""
    pipeline._interrupt = True
    raise StoppedAtStep(f"stopped after step {step + 1}")


def default_loader(spec: ModelSpec) -> PipelineLoader:
    """How a worker loads ``spec`` unless told otherwise: through its node's host memory
    when its catalog entry says ``host_memory``, else from its files."""
    return load_through_host_memory if spec.host_memory else load_pipeline


def load_warm_pipeline(
    spec: ModelSpec,
    *,
    cache_dir: str,
    load: PipelineLoader | None,
    torch_threads: int | None,
    warm_up: Callable[[Any], object],
) -> Any:
    """Set torch to the CPUs Ray assigned (or ``torch_threads``), load the model (with
    ``load``, else ``default_loader``) and run ``warm_up`` on it once, so the first
    request does not pay for lazy initialisation."""
    import torch

    threads = torch_threads or assigned_cpus()
    if threads:
        torch.set_num_threads(threads)
    pipeline = (load or default_loader(spec))(spec, cache_dir=Path(cache_dir))
    started = time.perf_counter()
    warm_up(pipeline)
    logger.info("%s warmed up in %.2fs", spec.id, time.perf_counter() - started)
    return pipeline
