"""The step-level image worker's answers: a seat shed after its tier's wait is the
scheduler's 503 (Overloaded), not a generation failure (500), and a call that fails
takes its other seats out instead of leaving them to run for nobody."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deployments.workers.step_level import StepLevelTextToImage
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import Overloaded
from tests.unit.test_stepping import job

STEPS = 10


def simulated_worker(tmp_path: Path) -> StepLevelTextToImage:
    spec = ModelSpec.model_validate(
        {
            "id": "sim",
            "task": "text-to-image",
            "source": "simulated://sim?step_ms=20",
            "num_gpus": 0,
            "defaults": {"size": "64x64", "num_inference_steps": STEPS, "guidance_scale": 1.0},
            "caps": {"max_width": 64, "max_height": 64, "max_steps": STEPS, "max_n": 1},
            "batching": {"max_batch_size": 1, "batch_wait_s": 0.0},
            "stepping": {"seats_per_replica": 4},
        }
    )
    return StepLevelTextToImage(spec, cache_dir=str(tmp_path))


def seat(name: str, cls: int, **fields: Any) -> Any:
    return job(name, priority_class=cls, num_inference_steps=STEPS, account_id=name, **fields)


def test_a_seat_shed_after_its_tiers_wait_answers_overloaded_not_failed(tmp_path: Path) -> None:
    worker = simulated_worker(tmp_path)

    async def run() -> None:
        pro = asyncio.ensure_future(worker.generate([seat("pro", 2)]))
        await asyncio.sleep(0.05)  # pro holds the one image a step takes
        with pytest.raises(Overloaded, match="waited longer"):
            await worker.generate([seat("free", 0, max_wait_s=0.01)])
        [made] = await pro
        assert made.images

    asyncio.run(run())
    assert worker.engine.counts["shed_unstarted"] == 1


def test_a_call_that_fails_takes_its_other_seats_out(tmp_path: Path) -> None:
    worker = simulated_worker(tmp_path)

    async def run() -> None:
        blocker = asyncio.ensure_future(worker.generate([seat("pro", 2)]))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):  # one shed seat: the call answers 503 as one
            await worker.generate([seat("late", 0, max_wait_s=0.01), seat("slow", 0)])
        await blocker

    asyncio.run(run())
    assert worker.engine.counts["shed_unstarted"] == 1
    assert worker.engine.counts["cancelled"] == 1, (
        worker.engine.counts
    )  # "slow" did not run on for nobody


def test_no_jobs_is_no_results(tmp_path: Path) -> None:
    assert asyncio.run(simulated_worker(tmp_path).generate([])) == []


def test_a_seat_refused_takes_back_the_seats_given_before_it(tmp_path: Path) -> None:
    worker = simulated_worker(tmp_path)
    twice = seat("twice", 0)

    warm_up_seats = len(worker.engine.first_step_waits_s)

    async def run() -> None:
        blocker = asyncio.ensure_future(worker.generate([seat("pro", 2)]))
        await asyncio.sleep(0.05)  # pro holds the one image a step takes
        with pytest.raises(ValueError, match="already has a seat"):
            await worker.generate([twice, twice])
        await blocker
        for _ in range(100):  # until the engine has let every seat go
            if not worker.engine.snapshot().seats:
                break
            await asyncio.sleep(0.05)

    asyncio.run(run())
    assert worker.engine.snapshot().seats == 0
    started = [cls for cls, _ in list(worker.engine.first_step_waits_s)[warm_up_seats:]]
    assert started == [2], started  # the refused call's first seat never ran
