"""A step-level video worker (deployments/workers/video_steps.py) without Ray: the tiny
Wan pipeline, a real SQLite store and local files. A higher-class job pauses a lower
one at a step and the paused one resumes to the very frames it makes unpaused; a
running job writes a checkpoint every few steps, and a job whose worker lost it
resumes from the last one (same frames as an unbroken run) and leaves no checkpoint
behind once done."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mediagate.protocol.catalog import StepLevel
from mediagate.protocol.work import VideoOutcome
from tests.unit.test_text_to_video import SPEC, Rig, decode

STEPPED = SPEC.model_copy(
    update={"stepping": StepLevel(seats_per_replica=2, checkpoint_every_steps=2)}
)


class StepGate:
    """Holds the worker's step loop before the step that would take a job past
    ``hold_at`` steps, until the test opens it."""

    def __init__(self, rig: Rig, hold_at: int) -> None:
        assert rig.worker.steps is not None
        stepper = rig.worker.steps.engine.stepper
        self.inner = stepper.step
        self.hold_at = hold_at
        self.reached = threading.Event()
        self.opened = threading.Event()
        self.batches: list[list[str]] = []
        stepper.step = self.step  # type: ignore[method-assign]

    def step(self, states: Any) -> None:
        if any(state.step_index >= self.hold_at for state in states):
            self.reached.set()
            assert self.opened.wait(60), "the test never opened the gate"
        self.batches.append([state.generation.prompt for state in states])
        self.inner(states)


def frames(rig: Rig, job_artifacts: dict[str, str]) -> np.ndarray:
    return np.stack(decode(rig.artifacts.read(job_artifacts["video"])))


async def made_video(rig: Rig, job_id: str) -> np.ndarray:
    job = await rig.job(job_id)
    assert job is not None and job.status == "completed", job
    return frames(rig, job.artifacts)


async def wait_until(condition: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def checkpoint_files(rig: Rig) -> list[str]:
    return sorted(path.name for path in rig.files.glob("ckp_*"))


async def test_a_higher_class_job_pauses_a_lower_one_which_resumes_to_the_same_video(
    tmp_path: Path, model_cache: Path
) -> None:
    rig = Rig(tmp_path, model_cache, spec=STEPPED)
    free_task = await rig.dispatch("video_free", prompt="free", num_inference_steps=6, seed=4)
    pro_task = await rig.dispatch("video_pro", prompt="pro", priority_class=2, seed=9)
    gate = StepGate(rig, hold_at=2)
    free_run = asyncio.create_task(rig.worker.run(free_task))
    await asyncio.to_thread(gate.reached.wait, 60)  # free has run 2 steps
    pro_run = asyncio.create_task(rig.worker.run(pro_task))
    await wait_until(lambda: _seats(rig, 2))
    gate.opened.set()
    pro_done: VideoOutcome = await pro_run
    assert not free_run.done() or (await free_run).status == "completed"
    free_done: VideoOutcome = await free_run
    assert pro_done.status == free_done.status == "completed"
    # free ran 2 steps, then its third (the step held), then pro its 4, then free the rest
    assert gate.batches == [["free"]] * 3 + [["pro"]] * 4 + [["free"]] * 3
    paused_free = await made_video(rig, "video_free")
    paused_pro = await made_video(rig, "video_pro")

    alone = Rig(tmp_path / "alone", model_cache)  # the whole-pipeline worker
    alone_runs: list[tuple[str, dict[str, Any]]] = [
        ("video_free", {"prompt": "free", "num_inference_steps": 6, "seed": 4}),
        ("video_pro", {"prompt": "pro", "seed": 9}),
    ]
    for job_id, fields in alone_runs:
        assert (await alone.worker.run(await alone.dispatch(job_id, **fields))).status == (
            "completed"
        )
    # the stepped loop matches the pipeline call to ~1e-7 before rounding to uint8
    assert np.abs(paused_free.astype(int) - (await made_video(alone, "video_free"))).max() <= 1
    assert np.abs(paused_pro.astype(int) - (await made_video(alone, "video_pro"))).max() <= 1


async def _seats(rig: Rig, count: int) -> bool:
    assert rig.worker.steps is not None
    return int(rig.worker.steps.engine.stats()["seats"]) >= count


async def test_a_job_lost_mid_way_resumes_from_its_last_checkpoint(
    tmp_path: Path, model_cache: Path
) -> None:
    rig = Rig(tmp_path, model_cache, spec=STEPPED, progress_interval_s=0.0)
    fields: dict[str, Any] = {"num_inference_steps": 8, "seed": 21, "prompt": "a lighthouse"}
    task = await rig.dispatch("video_lost", **fields)
    gate = StepGate(rig, hold_at=5)
    first_run = asyncio.create_task(rig.worker.run(task))
    await asyncio.to_thread(gate.reached.wait, 60)  # 5 steps done: checkpoints at 2 and 4

    async def checkpoint_at_4() -> bool:
        job = await rig.job("video_lost")
        return job is not None and job.checkpoint is not None and job.checkpoint.step == 4

    await wait_until(checkpoint_at_4)
    assert len(checkpoint_files(rig)) == 1  # the one at step 2 was replaced
    job = await rig.job("video_lost")
    assert job is not None and job.checkpoint is not None
    progress_at_loss = job.progress
    # the worker is lost: the scheduler takes the job back and dispatches it again
    retaken = await rig.store.update_job(
        "acct", "video_lost", expect_status=("in_progress",), changes={"attempt": 2}
    )
    assert retaken is not None
    gate.opened.set()
    assert (await first_run).status == "cancelled"  # its next write found it was not its own
    second = task.model_copy(update={"attempt": 2, "checkpoint": job.checkpoint.artifact})
    resumed = await rig.worker.run(second)
    assert resumed.status == "completed"
    assert resumed.resumed_at_step == 4 and resumed.steps_done == 4
    assert job.checkpoint.progress >= progress_at_loss - int(95 * 2 / 8) - 1
    done = await rig.job("video_lost")
    assert done is not None and done.checkpoint is None and done.progress == 100
    assert checkpoint_files(rig) == []  # done: no checkpoint left behind

    unbroken = Rig(tmp_path / "unbroken", model_cache, spec=STEPPED)
    assert (await unbroken.worker.run(await unbroken.dispatch("video_lost", **fields))).status == (
        "completed"
    )
    assert np.array_equal(
        await made_video(rig, "video_lost"), await made_video(unbroken, "video_lost")
    )


async def test_a_checkpoint_that_cannot_be_read_means_starting_over(
    tmp_path: Path, model_cache: Path
) -> None:
    rig = Rig(tmp_path, model_cache, spec=STEPPED)
    task = await rig.dispatch("video_gone", num_inference_steps=4)
    gone = task.model_copy(update={"checkpoint": "ckp_" + "0" * 32 + ".pt"})
    outcome = await rig.worker.run(gone)
    assert outcome.status == "completed" and outcome.resumed_at_step == 0
    assert outcome.steps_done == 4


def test_checkpoints_are_never_handed_out_by_url(tmp_path: Path) -> None:
    from mediagate.protocol.errors import NotFound
    from mediagate.stores.artifacts import LocalArtifactStore

    store = LocalArtifactStore(tmp_path, b"k" * 32)
    artifact = store.put(b"state", "pt", "ckp")
    assert store.read(artifact) == b"state"  # the service reads it
    path = store.signed_path(artifact, 60)
    expires, signature = path.split("expires=")[1].split("&signature=")
    with pytest.raises(NotFound):
        store.read_signed(artifact, int(expires), signature)
