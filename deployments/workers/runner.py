"""What both workers share around a diffusers pipeline: torch's threads, loading and
warming up the model, and stopping the denoising loop at the next step."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mediagate.protocol.catalog import ModelSpec
from models.device import assigned_cpus

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


def load_warm_pipeline(
    spec: ModelSpec,
    *,
    cache_dir: str,
    load: PipelineLoader,
    torch_threads: int | None,
    warm_up: Callable[[Any], object],
) -> Any:
    """Set torch to the CPUs Ray assigned (or ``torch_threads``), load the model and run
    ``warm_up`` on it once, so the first request does not pay for lazy initialisation."""
    import torch

    threads = torch_threads or assigned_cpus()
    if threads:
        torch.set_num_threads(threads)
    pipeline = load(spec, cache_dir=Path(cache_dir))
    started = time.perf_counter()
    warm_up(pipeline)
    logger.info("%s warmed up in %.2fs", spec.id, time.perf_counter() - started)
    return pipeline
