"""How soon a pro request gets its first denoising step on a busy step-level worker
(issue 17), in steps.

A worker replica's step engine (deployments/workers/step_engine.py) is kept busy by
free requests: their seats are refilled as they finish, so there are always more free
seats than a step's batch holds. Pro requests arrive one at a time at random moments
(uniform over two step times after the previous one's first step, so they land
anywhere inside a step); each records the time from its submission to the start of its
first step. The figure is that wait's p99 over the mean step time measured in the same
run, on the REAL tiny Stable Diffusion pipeline (diffusers classes with random
weights, CPU: its steps take tens of milliseconds; 64x64, the catalog's 4 steps,
guidance on) and on the SIMULATED stepper (20 steps of 8 ms, a batch of B images
costing 8 ms x (1 + 0.1 (B - 1))). A whole-pipeline worker has no such point: a pro
request waits for the running call to end or be thrown away.

No Ray: the engine runs in this process, as in a worker replica. Prints a summary and,
on its last line, one JSON object.
Usage: python scripts/bench_step_join.py [--pro 200] [--free-seats 6] [--max-batch 4]
       [--models tiny-sd,sim] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarking import percentile

from deployments.workers.step_engine import StepEngine, Stepper
from mediagate.protocol.work import ImageJob

FREE, PRO = 0, 2


class TimedStepper:
    """A stepper that records how long each of its steps takes."""

    def __init__(self, inner: Stepper) -> None:
        self.inner = inner
        self.step_s: list[float] = []

    def start(self, job: ImageJob) -> Any:
        return self.inner.start(job)

    def step(self, states: Any) -> None:
        began = time.perf_counter()
        self.inner.step(states)
        self.step_s.append(time.perf_counter() - began)

    def finish(self, state: Any) -> list[Any]:
        return self.inner.finish(state)

    def held_bytes(self, state: Any) -> int:
        return self.inner.held_bytes(state)

    def offload(self, state: Any) -> None:
        self.inner.offload(state)

    def reload(self, state: Any) -> None:
        self.inner.reload(state)


def tiny_sd_stepper(cache_dir: Path) -> tuple[Stepper, dict[str, Any]]:
    import torch

    from models.catalog import load_catalog
    from models.loading import load_pipeline
    from models.stepping.stable_diffusion import StableDiffusionStepper

    torch.set_num_threads(1)
    spec = load_catalog().models["tiny-sd"]
    pipeline = load_pipeline(spec, cache_dir=cache_dir)
    defaults = spec.defaults
    width, height = (int(side) for side in defaults.size.split("x"))
    job_fields = {
        "width": width,
        "height": height,
        "num_inference_steps": defaults.num_inference_steps,
        "guidance_scale": defaults.guidance_scale,
    }
    return StableDiffusionStepper(pipeline), job_fields


def simulated_stepper() -> tuple[Stepper, dict[str, Any]]:
    from models.stepping.simulated import SimulatedStepper

    job_fields = {"width": 64, "height": 64, "num_inference_steps": 20, "guidance_scale": 1.0}
    return SimulatedStepper(8.0, batch_cost=0.1), job_fields


def make_job(name: str, priority_class: int, job_fields: dict[str, Any]) -> ImageJob:
    return ImageJob(
        request_id=name,
        account_id=name,
        prompt=f"a lighthouse at dusk {name}",
        num_images_per_prompt=1,
        seed=7,
        output_format="png",
        priority_class=priority_class,
        **job_fields,
    )


def measure(
    stepper: Stepper, job_fields: dict[str, Any], *, pros: int, free_seats: int, max_batch: int
) -> dict[str, Any]:
    timed = TimedStepper(stepper)
    engine = StepEngine(timed, max_batch_images=max_batch)
    stop = threading.Event()
    free_made = [0]

    def keep_busy(index: int) -> None:
        """One free seat, refilled when it finishes, until the run stops."""
        if stop.is_set():
            return
        future = engine.submit(make_job(f"free-{index}-{free_made[0]}", FREE, job_fields))
        free_made[0] += 1
        future.add_done_callback(lambda _: keep_busy(index))

    for index in range(free_seats):
        keep_busy(index)
    while len(timed.step_s) < 3:  # the free seats are running
        time.sleep(0.01)
    warm_steps = len(timed.step_s)
    rng = random.Random(17)
    waits_s: list[float] = []
    held_during_pro: list[int] = []
    for index in range(pros):
        step_s = statistics.fmean(timed.step_s[warm_steps:] or timed.step_s)
        time.sleep(rng.uniform(0, 2 * step_s))
        held_during_pro.append(engine.stats()["seats"])
        outcome = engine.submit(make_job(f"pro-{index}", PRO, job_fields))
        waits_s.append(outcome.result(timeout=120).first_step_wait_s)
    stop.set()
    steps = timed.step_s[warm_steps:]
    snapshot = engine.snapshot()
    engine.stop()
    step_s = statistics.fmean(steps)
    return {
        "pro_requests": pros,
        "steps_measured": len(steps),
        "mean_step_ms": round(1000 * step_s, 2),
        "first_step_wait_p50_ms": round(1000 * percentile(waits_s, 50), 2),
        "first_step_wait_p99_ms": round(1000 * percentile(waits_s, 99), 2),
        "first_step_wait_max_ms": round(1000 * max(waits_s), 2),
        "p99_over_step": round(percentile(waits_s, 99) / step_s, 3),
        "seats_held_when_pro_arrived_min": min(held_during_pro),
        "images_per_step": snapshot.images_per_step,
        "free_requests_served": free_made[0] - free_seats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pro", type=int, default=200, help="pro arrivals per model")
    parser.add_argument("--free-seats", type=int, default=6)
    parser.add_argument("--max-batch", type=int, default=4, help="images in one step")
    parser.add_argument("--models", default="tiny-sd,sim")
    parser.add_argument("--smoke", action="store_true", help="a few arrivals")
    args = parser.parse_args()
    pros = 5 if args.smoke else args.pro
    result: dict[str, Any] = {"max_batch": args.max_batch, "free_seats": args.free_seats}
    with tempfile.TemporaryDirectory() as cache:
        for model in args.models.split(","):
            stepper, job_fields = (
                tiny_sd_stepper(Path(cache)) if model == "tiny-sd" else simulated_stepper()
            )
            figures = measure(
                stepper,
                job_fields,
                pros=pros,
                free_seats=args.free_seats,
                max_batch=args.max_batch,
            )
            result[model] = figures
            print(f"{model}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
