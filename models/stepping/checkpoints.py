"""A stepped job's state as bytes and back (issue 17): its latents, its step index and
its scheduler's running state, written every few steps so that when its worker is lost
the next one resumes there instead of at step 0.

Only tensors and plain values are written (``torch.save`` of a dict) and they are read
back with ``torch.load(weights_only=True)``: a checkpoint kept in a shared artifact
store is data, never code (a pickled scheduler object would run whatever the file says
when it is loaded). The resumed state is built as a new one is (``Stepper.start``: the
prompt encoded again, a fresh scheduler copy with its timesteps), then the saved
latents, step index and every plain attribute of the scheduler (its step index, a
multistep scheduler's history of model outputs and orders) replace the fresh ones.
Schedulers that draw noise per step would also need their generator's state, which is
not kept: the steppers here pass none (flow matching and UniPC draw nothing).
"""

from __future__ import annotations

import io
from typing import Any, Protocol, TypeVar

FORMAT = 1
PLAIN_SCALARS = (int, float, bool, str, type(None))


class SteppedJobState(Protocol):
    latents: Any
    step_index: int
    scheduler: Any


State = TypeVar("State", bound=SteppedJobState)


def _plain(value: Any) -> bool:
    import torch

    if isinstance(value, (torch.Tensor, *PLAIN_SCALARS)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return False


def checkpoint_bytes(state: SteppedJobState) -> bytes:
    """The state's latents, step index and its scheduler's plain attributes."""
    import torch

    scheduler = {name: value for name, value in vars(state.scheduler).items() if _plain(value)}
    buffer = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "step_index": state.step_index,
            "latents": state.latents,
            "scheduler": scheduler,
        },
        buffer,
    )
    return buffer.getvalue()


def checkpoint_step(data: bytes) -> int:
    """The step a checkpoint resumes at (what it holds was made by that many steps)."""
    return int(_load(data, "cpu")["step_index"])


def resume(fresh: State, data: bytes) -> State:
    """``fresh`` (a new state of the same job, from ``Stepper.start``) moved on to where
    the checkpoint was written; a ``ValueError`` for a checkpoint of another shape."""
    saved = _load(data, fresh.latents.device)
    if saved.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {saved.get('format')!r}, expected {FORMAT}")
    latents = saved["latents"]
    if tuple(latents.shape) != tuple(fresh.latents.shape):
        raise ValueError(
            f"checkpoint latents {tuple(latents.shape)} do not fit this job's "
            f"{tuple(fresh.latents.shape)}"
        )
    fresh.latents = latents.to(fresh.latents.dtype)
    fresh.step_index = int(saved["step_index"])
    vars(fresh.scheduler).update(saved["scheduler"])
    return fresh


def _load(data: bytes, device: Any) -> dict[str, Any]:
    import torch

    try:
        loaded = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as error:  # truncated, or not ours: the job starts over instead
        raise ValueError(f"unreadable checkpoint: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError("unreadable checkpoint: not a mapping")
    return loaded
