"""A SIMULATED pipeline for scheduling and autoscaling tests and benchmarks only.

It sleeps a fixed time per denoising step for the whole batch, as a GPU replica
waits on its device, without burning the CPU cores that the rest of the system
needs, and returns solid-colour images of the requested size (the colour follows
the seed). It is never in the default catalog and is always named as what it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class SimulatedOutput:
    images: list[Any]
    frames: Any = None


class SimulatedPipeline:
    """Sleeps ``step_ms`` per step; answers like a diffusers text-to-image or -video pipeline."""

    def __init__(
        self,
        step_ms: float,
        *,
        batch_cost: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.step_ms = step_ms
        self.batch_cost = batch_cost  # a step of B images: step_ms x (1 + batch_cost x (B - 1))
        self._sleep = sleep
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def set_progress_bar_config(self, **_: Any) -> None:
        """Accepted for interface parity with diffusers pipelines."""

    def to(self, *_: Any, **__: Any) -> SimulatedPipeline:
        return self

    def __call__(
        self,
        prompt: str | list[str],
        *,
        width: int,
        height: int,
        num_inference_steps: int,
        num_images_per_prompt: int = 1,
        num_frames: int | None = None,
        output_type: str = "pil",
        generator: Any = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        **_: Any,
    ) -> SimulatedOutput:
        from PIL import Image

        self._interrupt = False
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        count = len(prompts) * num_images_per_prompt
        for step in range(num_inference_steps):
            if self._interrupt:
                break
            self._sleep(self.step_ms / 1000 * (1 + self.batch_cost * (count - 1)))
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, step, {})
        generators = generator if isinstance(generator, list) else [generator] * count
        if num_frames is not None:  # a video pipeline: frames in [0, 1], (batch, F, H, W, 3)
            import numpy as np

            seed = generators[0].initial_seed() if generators[0] is not None else 0
            shade = (seed % 255) / 255
            return SimulatedOutput(
                images=[], frames=np.full((1, num_frames, height, width, 3), shade, np.float32)
            )
        images = []
        for index in range(count):
            seed = generators[index].initial_seed() if generators[index] is not None else index
            colour = (seed * 2654435761) & 0xFFFFFF
            images.append(
                Image.new("RGB", (width, height), (colour >> 16, (colour >> 8) & 255, colour & 255))
            )
        return SimulatedOutput(images=images)
