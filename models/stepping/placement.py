"""A stepped request's tensors moved between the model's device and host memory (issue
17): a request that sits out steps (paused by higher classes, or not started) can wait
in host memory when the device's is short, and comes back for its next step. What
moves: its latents, prompt embeddings (and negative ones, and SDXL's added
conditioning), its timesteps and every tensor its own scheduler copy holds (a
multistep scheduler's history). Moving is exact: the values do not change."""

from __future__ import annotations

from typing import Any


def _moved(value: Any, device: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list) and any(isinstance(item, torch.Tensor) for item in value):
        return [_moved(item, device) for item in value]
    return value


def held_bytes(state: Any) -> int:
    """Memory the tensors ``move_state`` moves take (each counted once: a state's
    timesteps are its scheduler's)."""
    import torch

    tensors: dict[int, Any] = {}

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors[id(value)] = value
        elif isinstance(value, list):
            for item in value:
                add(item)

    for name in ("latents", "prompt_embeds", "negative_embeds", "timesteps"):
        add(getattr(state, name, None))
    for value in (getattr(state, "added_cond", None) or {}).values():
        add(value)
    for value in vars(state.scheduler).values():
        add(value)
    return sum(tensor.element_size() * tensor.nelement() for tensor in tensors.values())


def move_state(state: Any, device: Any) -> None:
    """Every tensor of ``state`` onto ``device`` (in place)."""
    for name in ("latents", "prompt_embeds", "negative_embeds", "timesteps"):
        if getattr(state, name, None) is not None:
            setattr(state, name, _moved(getattr(state, name), device))
    added = getattr(state, "added_cond", None)
    if added:
        state.added_cond = {key: _moved(value, device) for key, value in added.items()}
    scheduler = state.scheduler
    for name, value in list(vars(scheduler).items()):
        moved = _moved(value, device)
        if moved is not value:
            setattr(scheduler, name, moved)
