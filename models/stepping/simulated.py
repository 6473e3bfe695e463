"""A SIMULATED stepper, for scheduling and autoscaling measurements only (issue 17).

One step of a batch of B images sleeps ``step_ms x (1 + batch_cost x (B - 1))``: the
sub-linear batch cost of a GPU (a batch of 8 costs 1.7 steps, not 8), without
burning the CPU cores the rest of the system needs. Its images are solid colours
that follow the seed, as ``models/simulated.py``'s are. Never in the default catalog.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from mediagate.protocol.work import ImageJob, image_seeds


@dataclass(eq=False)
class SimulatedState:
    job: ImageJob
    step_index: int = 0

    @property
    def steps(self) -> int:
        return self.job.num_inference_steps

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    @property
    def batch_key(self) -> Hashable:
        return (self.job.width, self.job.height, self.job.guidance_scale > 1)


class SimulatedStepper:
    """Sleeps per step as a GPU would wait on its device."""

    def __init__(
        self,
        step_ms: float,
        *,
        batch_cost: float = 0.1,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.step_ms = step_ms
        self.batch_cost = batch_cost
        self._sleep = sleep

    def start(self, job: ImageJob) -> SimulatedState:
        return SimulatedState(job)

    def step(self, states: Sequence[SimulatedState]) -> None:
        images = sum(state.job.images for state in states)
        self._sleep(self.step_ms / 1000 * (1 + self.batch_cost * (images - 1)))
        for state in states:
            state.step_index += 1

    def held_bytes(self, state: SimulatedState) -> int:
        return 0  # it holds no tensors

    def offload(self, state: SimulatedState) -> None:
        pass  # nothing to move

    def reload(self, state: SimulatedState) -> None:
        pass

    def finish(self, state: SimulatedState) -> list[Any]:
        from PIL import Image

        images = []
        for seed in image_seeds([state.job]):
            colour = (seed * 2654435761) & 0xFFFFFF
            rgb = (colour >> 16, (colour >> 8) & 255, colour & 255)
            images.append(Image.new("RGB", (state.job.width, state.job.height), rgb))
        return images
