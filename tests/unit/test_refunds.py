"""Quota comes back for work that never started (or failed on our side), never for
work a worker ran: a caller who disconnects once its batch runs is charged."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from mediagate.protocol.errors import GenerationFailed, InvalidRequest
from mediagate.protocol.images import ImageGenerationRequest
from mediagate.protocol.work import ImageJob, ImageResult
from tests.unit.harness import Service
from tests.unit.test_queue_discipline import job, one_slot_scheduler


@pytest.mark.parametrize(("started", "images_charged"), [(False, 0), (True, 1)])
async def test_a_caller_who_leaves_pays_only_if_its_work_started(
    tmp_path: Path, started: bool, images_charged: int
) -> None:
    service = Service(tmp_path, tier="free")
    forwarded = asyncio.Event()

    async def never_answers(job: ImageJob) -> ImageResult:
        service.scheduler.jobs.append(job)
        forwarded.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    service.scheduler.submit = never_answers  # type: ignore[method-assign]
    service.scheduler.started_when_withdrawn = started
    account = service.accounts.get_account("alice")
    assert account is not None
    request = asyncio.create_task(
        service.gateway.images.generate(
            account,
            ImageGenerationRequest(prompt="a cat"),
            request_id="req-1",
            base_url="http://127.0.0.1",
        )
    )
    await asyncio.wait_for(forwarded.wait(), 10)
    request.cancel()  # what Serve does when the HTTP client disconnects
    with contextlib.suppress(asyncio.CancelledError):
        await request
    assert service.scheduler.withdrawn == ["req-1"]
    usage = await service.gateway.guard.ledger.usage(account)
    assert usage.images_today == images_charged


async def test_the_scheduler_tells_started_work_from_work_that_never_will_run() -> None:
    worker, _, scheduler = one_slot_scheduler()
    running = asyncio.create_task(scheduler.submit(job("running", max_wait_s=600)))
    await worker.wait_for_batches(1)
    queued = asyncio.create_task(scheduler.submit(job("queued", max_wait_s=600)))
    doomed = asyncio.create_task(scheduler.submit(job("doomed", max_wait_s=600)))
    await asyncio.sleep(0.01)
    assert scheduler.stats()["queue_len"] == 2

    # The router asks before its cancellation reached us: "doomed" must then never run.
    assert scheduler.withdraw("a", "doomed") is False
    for left in (running, queued):
        left.cancel()
    await asyncio.gather(running, queued, return_exceptions=True)
    assert scheduler.withdraw("a", "running") is True  # its batch was on a worker: spent
    assert scheduler.withdraw("a", "queued") is False  # left the queue unstarted
    assert scheduler.withdraw("a", "never-arrived") is False
    assert scheduler.withdraw("b", "running") is False  # ids are the clients': per account
    with pytest.raises(InvalidRequest, match="withdrawn"):  # and it is not run late
        await scheduler.submit(job("never-arrived", "a", max_wait_s=600))

    worker.release.set()
    await asyncio.sleep(0.05)
    assert [batch[0].request_id for batch in worker.batches] == ["running"]
    assert scheduler.stats()["queue_len"] == 0
    with pytest.raises(GenerationFailed, match="withdrawn"):  # answered, not left hanging
        await doomed
    await scheduler.shutdown()


async def test_answered_requests_do_not_stay_in_the_deadline_heap() -> None:
    """Their results (raw pixels) would otherwise live as long as the tier's longest wait."""
    worker, _, scheduler = one_slot_scheduler()
    worker.release.set()
    for index in range(300):
        await scheduler.submit(job(f"r{index}", max_wait_s=600))
    assert len(scheduler._deadlines) <= 64 + 1
    await scheduler.shutdown()


async def test_a_failure_to_store_the_images_is_ours_and_not_charged(tmp_path: Path) -> None:
    service = Service(tmp_path, tier="free")

    def broken_put(*args: object) -> str:
        raise OSError("disk full")

    service.gateway.artifacts.put = broken_put  # type: ignore[method-assign,assignment]
    answer = service.generate({"prompt": "a cat", "response_format": "url"})
    assert answer.status_code == 500, answer.text
    account = service.accounts.get_account("alice")
    assert account is not None
    assert (await service.gateway.guard.ledger.usage(account)).images_today == 0
