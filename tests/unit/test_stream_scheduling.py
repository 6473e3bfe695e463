"""Streamed jobs in the scheduler and the worker: partial images reach their own
caller only, streamed and plain jobs share batches, a batch taken back and run again
sends no preview twice, a caller who leaves takes its ticket off the queue, and the
real tiny pipeline's previews are its VAE's decode of the latents mid-way (the final
image unchanged by them)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from deployments.workers.image_steps import PreviewPlan
from deployments.workers.text_to_image import TextToImage, generate_batch
from mediagate.protocol.work import ImageResult, PartialImage, RawImage, StreamQueued, preview_steps
from models.catalog import load_catalog
from tests.unit.test_queue_discipline import job, learn_service_time, one_slot_scheduler


async def collect(streamed: Any) -> list[Any]:
    return [item async for item in streamed]


def test_previews_are_evenly_spaced_and_never_after_the_last_step() -> None:
    assert preview_steps(20, 3) == [4, 9, 14]
    assert preview_steps(4, 3) == [0, 1, 2]
    assert preview_steps(4, 1) == [1]
    assert preview_steps(2, 3) == [0]  # too few steps: fewer previews
    assert preview_steps(1, 2) == []
    assert preview_steps(10, 0) == []


async def test_a_streamed_job_gets_queued_then_its_previews_then_its_result() -> None:
    worker, _, scheduler = one_slot_scheduler(batching={"max_batch_size": 2})
    worker.release.set()
    items = await collect(scheduler.submit_streaming(job("s", partial_images=2)))
    assert isinstance(items[0], StreamQueued)
    assert [(p.image_index, p.partial_image_index) for p in items[1:3]] == [(0, 0), (0, 1)]
    assert isinstance(items[3], ImageResult) and items[3].request_id == "s"
    assert len(items) == 4
    await scheduler.shutdown()


async def test_streamed_and_plain_jobs_share_a_batch_and_previews_go_to_their_owner() -> None:
    worker, clock, scheduler = one_slot_scheduler(batching={"max_batch_size": 4})
    await learn_service_time(scheduler, worker, clock)
    blocker = asyncio.create_task(scheduler.submit(job("blocker", "z", max_wait_s=600)))
    await worker.wait_for_batches(2)
    plain = asyncio.create_task(scheduler.submit(job("plain", "a", max_wait_s=600)))
    one = asyncio.create_task(
        collect(scheduler.submit_streaming(job("one", "b", partial_images=1)))
    )
    three = asyncio.create_task(
        collect(
            scheduler.submit_streaming(
                job("three", "c", partial_images=3, num_images_per_prompt=2, max_wait_s=600)
            )
        )
    )
    await asyncio.sleep(0.01)
    worker.release.set()
    await blocker
    await worker.wait_for_batches(3)
    assert [j.request_id for j in worker.batches[2]] == ["plain", "one", "three"]
    assert (await plain).request_id == "plain"
    one_items, three_items = await one, await three
    assert [type(item).__name__ for item in one_items] == [
        "StreamQueued",
        "PartialImage",
        "ImageResult",
    ]
    previews = [item for item in three_items if isinstance(item, PartialImage)]
    assert len(previews) == 6  # 3 previews x 2 images, none of the other jobs'
    assert {(p.image_index, p.partial_image_index) for p in previews} == {
        (i, p) for i in range(2) for p in range(3)
    }
    assert three_items[-1].request_id == "three"
    await scheduler.shutdown()


async def test_a_preempted_streamed_batch_runs_again_without_repeating_previews() -> None:
    worker, clock, scheduler = one_slot_scheduler()
    await learn_service_time(scheduler, worker, clock)
    free = asyncio.create_task(
        collect(scheduler.submit_streaming(job("free", "f", partial_images=2, max_wait_s=600)))
    )
    await worker.wait_for_batches(2)
    clock.advance(1)
    pro = asyncio.create_task(scheduler.submit(job("pro", "p", cls=2, max_wait_s=600)))
    await worker.wait_for_batches(3)
    assert worker.stopped == [["free"]]
    worker.release.set()
    await pro
    items = await free
    assert [b[0].request_id for b in worker.batches] == ["warm", "free", "pro", "free"]
    previews = [
        (p.image_index, p.partial_image_index) for p in items if isinstance(p, PartialImage)
    ]
    assert previews == [(0, 0), (0, 1)]  # the re-run made them again; sent once
    assert items[-1].request_id == "free"
    await scheduler.shutdown()


async def test_a_streamed_caller_who_leaves_the_queue_takes_its_ticket_along() -> None:
    worker, clock, scheduler = one_slot_scheduler()
    await learn_service_time(scheduler, worker, clock)
    blocker = asyncio.create_task(scheduler.submit(job("blocker", "z", max_wait_s=600)))
    await worker.wait_for_batches(2)
    streamed = scheduler.submit_streaming(job("leaver", "a", partial_images=1, max_wait_s=600))
    assert isinstance(await streamed.__anext__(), StreamQueued)
    assert scheduler.stats()["queue_len"] == 1
    waiting = asyncio.ensure_future(streamed.__anext__())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert scheduler.stats()["queue_len"] == 0
    assert scheduler.withdraw("a", "leaver") is False  # never ran: not charged
    worker.release.set()
    await blocker
    assert [b[0].request_id for b in worker.batches] == ["warm", "blocker"]
    await scheduler.shutdown()


@pytest.fixture(scope="module")
def tiny_worker(tmp_path_factory: pytest.TempPathFactory) -> TextToImage:
    spec = load_catalog().models["tiny-sd"]
    return TextToImage(spec, cache_dir=str(tmp_path_factory.mktemp("models")), torch_threads=1)


def pixels(raw: RawImage) -> np.ndarray:
    return np.frombuffer(raw.pixels, dtype=np.uint8).astype(int)


def test_real_previews_are_the_vae_decode_mid_way_and_leave_the_image_as_it_was(
    tiny_worker: TextToImage,
) -> None:
    pipeline = tiny_worker.pipeline
    jobs = [
        job("plain", seed=3, num_inference_steps=6),
        job("streamed", seed=5, num_inference_steps=6, partial_images=2, num_images_per_prompt=2),
    ]
    made: list[PartialImage] = []
    streamed_results = generate_batch(pipeline, jobs, previews=PreviewPlan(jobs, made.append))
    assert [(p.job_index, p.image_index, p.partial_image_index) for p in made] == [
        (1, 0, 0),
        (1, 1, 0),
        (1, 0, 1),
        (1, 1, 1),
    ]
    assert all((p.image.width, p.image.height) == (64, 64) for p in made)
    plain_results = generate_batch(pipeline, jobs)
    for streamed, plain in zip(streamed_results, plain_results, strict=True):
        for a, b in zip(streamed.images, plain.images, strict=True):
            assert a.pixels == b.pixels  # decoding previews changes nothing in the loop
    # The first preview is what the pipeline itself makes of the latents after step 1
    # (an interrupted diffusers loop decodes the latents it has): the same pixels.
    import torch

    def interrupt_after_step_1(pipe: Any, step: int, timestep: Any, kwargs: Any) -> Any:
        if step == 1:
            pipe._interrupt = True
        return kwargs

    output = pipeline(
        prompt=["p", "p"],
        width=64,
        height=64,
        num_inference_steps=6,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(seed) for seed in (5, 6)],
        output_type="pil",
        callback_on_step_end=interrupt_after_step_1,
    )
    for image_index, image in enumerate(output.images):
        expected = np.asarray(image.convert("RGB")).astype(int).reshape(-1)
        assert np.abs(pixels(made[image_index].image) - expected).max() <= 1


def test_real_inpaint_previews_keep_what_is_outside_the_mask(tiny_worker: TextToImage) -> None:
    from PIL import Image

    original = Image.new("RGB", (64, 64), (10, 200, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    edit = job(
        "inpaint",
        task="inpaint",
        strength=1.0,
        partial_images=1,
        init_image=RawImage(mode="RGB", width=64, height=64, pixels=original.tobytes()),
        mask_image=RawImage(mode="L", width=64, height=64, pixels=mask.tobytes()),
    )
    made: list[PartialImage] = []
    generate_batch(
        tiny_worker.pipelines["inpaint"], [edit], previews=PreviewPlan([edit], made.append)
    )
    [preview] = made
    image = pixels(preview.image).reshape(64, 64, 3)
    assert (image[:8, :8] == (10, 200, 30)).all()  # outside the mask: the input


async def test_the_worker_streams_previews_then_the_results(tiny_worker: TextToImage) -> None:
    items = [
        item
        async for item in tiny_worker.generate_streaming(
            [job("s", num_inference_steps=4, partial_images=3)]
        )
    ]
    assert [type(item).__name__ for item in items] == ["PartialImage"] * 3 + ["list"]
    results = items[-1]
    assert isinstance(results, list) and [r.request_id for r in results] == ["s"]


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_running_batch_nobody_waits_for_stops_and_frees_its_slot(streamed: bool) -> None:
    worker, clock, scheduler = one_slot_scheduler()
    await learn_service_time(scheduler, worker, clock)
    caller: asyncio.Future[Any]
    if streamed:
        stream = scheduler.submit_streaming(job("gone", "a", partial_images=1, max_wait_s=600))
        assert isinstance(await stream.__anext__(), StreamQueued)
        caller = asyncio.ensure_future(collect(stream))
    else:
        caller = asyncio.ensure_future(scheduler.submit(job("gone", "a", max_wait_s=600)))
    await worker.wait_for_batches(2)
    queued = asyncio.create_task(scheduler.submit(job("next", "b", max_wait_s=600)))
    await asyncio.sleep(0.01)
    caller.cancel()  # its router saw the client hang up
    with pytest.raises(asyncio.CancelledError):
        await caller
    await worker.wait_for_batches(3)  # the slot went to the waiting request
    assert worker.stopped == [["gone"]]
    assert scheduler.withdraw("a", "gone") is True  # it had started: charged
    worker.release.set()
    assert (await queued).request_id == "next"
    assert "preempted_class_0" not in scheduler.stats()
    await scheduler.shutdown()


async def test_a_batch_still_awaited_by_one_caller_runs_on() -> None:
    worker, clock, scheduler = one_slot_scheduler(batching={"max_batch_size": 2})
    await learn_service_time(scheduler, worker, clock)
    blocker = asyncio.create_task(scheduler.submit(job("blocker", "z", max_wait_s=600)))
    await worker.wait_for_batches(2)
    leaves = asyncio.create_task(scheduler.submit(job("leaves", "a", max_wait_s=600)))
    stays = asyncio.create_task(scheduler.submit(job("stays", "b", max_wait_s=600)))
    await asyncio.sleep(0.01)
    worker.release.set()
    await blocker
    worker.release.clear()
    await worker.wait_for_batches(3)
    leaves.cancel()
    await asyncio.sleep(0.01)
    assert worker.stopped == []
    worker.release.set()
    assert (await stays).request_id == "stays"
    await scheduler.shutdown()


def test_a_failing_preview_costs_the_batch_its_previews_not_its_images(
    tiny_worker: TextToImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deployments.workers.image_steps as image_steps

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory in the VAE")

    monkeypatch.setattr(image_steps, "decode_previews", broken)
    jobs = [
        job("plain", num_inference_steps=6),
        job("streamed", partial_images=3, num_inference_steps=6),
    ]
    made: list[PartialImage] = []
    results = generate_batch(tiny_worker.pipeline, jobs, previews=PreviewPlan(jobs, made.append))
    assert [r.request_id for r in results] == ["plain", "streamed"]
    assert made == []
