"""What a step-level model's scheduler reports about its workers' step loops (issue 17):
each worker's latest engine snapshot comes back with every result it sends, and each
result carries its request's wait to its first step. Plain data in, plain data out."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from deployments.scheduler.admission import p50_p99
from mediagate.protocol.work import ImageResult, StepEngineStats

RECENT_WAITS = 1000  # per class
STALE_AFTER_S = 10.0  # a worker with no result for this long has no recent steps
GONE_AFTER_S = 120.0  # ... and after this long is not counted at all (replaced, or idle)


class StepLevelReport:
    """The workers' latest snapshots and recent first-step waits, summed for status."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._engines: dict[str, StepEngineStats] = {}  # by worker replica
        self._waits: dict[int, deque[float]] = {}

    def record(self, result: ImageResult, priority_class: int) -> None:
        if result.engine is not None:
            latest = self._engines.get(result.worker)
            if latest is None or result.engine.at >= latest.at:
                self._engines[result.worker] = result.engine
        if result.first_step_wait_s is not None:
            waits = self._waits.setdefault(priority_class, deque(maxlen=RECENT_WAITS))
            waits.append(result.first_step_wait_s)

    def summary(self) -> dict[str, float]:
        """Over the workers heard from: steps per second and mean images per step
        recently, requests held and paused, the paused requests' device memory (MB), and
        those moved to host memory (and their MB)."""
        if not self._engines:
            return {}
        now = self._wall_clock()
        self._engines = {w: e for w, e in self._engines.items() if now - e.at <= GONE_AFTER_S}
        held = list(self._engines.values())
        fresh = [e for e in held if now - e.at <= STALE_AFTER_S]
        steps_per_s = sum(e.steps_per_s for e in fresh)
        images_per_s = sum(e.steps_per_s * e.images_per_step for e in fresh)
        return {
            "steps_per_s": round(steps_per_s, 2),
            "images_per_step": round(images_per_s / steps_per_s, 2) if steps_per_s else 0.0,
            "seats_held": sum(e.seats for e in held),
            "paused": sum(e.paused for e in held),
            "paused_mb": round(sum(e.paused_bytes for e in held) / 2**20, 2),
            "offloaded": sum(e.offloaded for e in held),
            "offloaded_mb": round(sum(e.offloaded_bytes for e in held) / 2**20, 2),
        }

    def first_step_waits_s(self) -> dict[int, dict[str, float]]:
        """Per class, the p50 and p99 of the recent waits from arrival to first step."""
        return {cls: p50_p99(waits, digits=4) for cls, waits in self._waits.items() if waits}
