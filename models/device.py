"""Where a pipeline runs and in which dtype: decided here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

DtypeName = Literal["auto", "float16", "bfloat16", "float32"]


@dataclass(frozen=True)
class Placement:
    """A device (``cuda`` or ``cpu``) and the torch dtype name to load weights in."""

    device: str
    dtype: str

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)


def choose_placement(
    requested: DtypeName, *, cuda_available: bool | None = None, bf16_supported: bool | None = None
) -> Placement:
    """CUDA with the requested half precision when a GPU is visible, else CPU float32.

    ``auto`` on a GPU means bfloat16 where the card supports it, float16 otherwise.
    Half precision on a CPU is slow or unsupported, so CPUs always get float32.
    """
    if cuda_available is None or bf16_supported is None:
        import torch

        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if bf16_supported is None:
            bf16_supported = bool(cuda_available and torch.cuda.is_bf16_supported())
    if not cuda_available:
        return Placement("cpu", "float32")
    if requested == "auto":
        return Placement("cuda", "bfloat16" if bf16_supported else "float16")
    return Placement("cuda", requested)


def assigned_cpus() -> int | None:
    """CPUs Ray gave this replica (torch should use that many threads); None outside Ray."""
    try:
        import ray

        if not ray.is_initialized():  # asking would start (or join) a Ray instance
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # outside Ray: leave torch's own default
        return None
    return max(1, int(cpus)) if cpus else None
