"""The outbox in both state stores (SQLite and a real redis-server): an event is written
with the transition that finishes its job or not at all, and senders take events up
one at a time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from mediagate.jobs.video import VideoJobLifecycle
from mediagate.stores import JobStore, StateConfig, open_state_store
from mediagate.stores.records import EndpointDelivery
from mediagate.webhooks.events import job_finished_event
from tests.unit.test_state_store import job


@pytest.fixture
async def store(state_config: StateConfig) -> AsyncIterator[JobStore]:
    job_store = open_state_store(state_config)
    yield job_store
    await job_store.close()


async def running(store: JobStore, job_id: str, account: str = "acct-a") -> None:
    await store.create_job(job(job_id, account, status="in_progress", attempt=1))


async def test_an_event_is_written_with_its_transition_only(store: JobStore) -> None:
    await running(store, "video_1")
    event = job_finished_event("acct-a", "video_1", "video.completed", now=2000.0)
    refused = await store.update_job(
        "acct-a",
        "video_1",
        expect_status=("in_progress",),
        expect_attempt=7,  # not this dispatch's: nothing changes, no event
        changes={"status": "completed"},
        events=[event],
    )
    assert refused is None
    assert await store.due_events(now=3000.0) == []

    done = await store.update_job(
        "acct-a",
        "video_1",
        expect_status=("in_progress",),
        expect_attempt=1,
        changes={"status": "completed"},
        events=[event],
    )
    assert done is not None and done.status == "completed"
    [due] = await store.due_events(now=3000.0)
    assert due == event
    assert await store.due_events(now=1999.0) == []  # not due before it was written
    body = json.loads(due.payload)
    assert body == {
        "id": event.id,
        "object": "event",
        "created_at": 2000,
        "type": "video.completed",
        "data": {"id": "video_1"},
    }


async def test_an_invalid_change_writes_neither_job_nor_event(store: JobStore) -> None:
    await running(store, "video_2")
    event = job_finished_event("acct-a", "video_2", "video.failed", now=2000.0)
    with pytest.raises(ValueError):
        await store.update_job(
            "acct-a",
            "video_2",
            expect_status=("in_progress",),
            changes={"status": "no-such-status"},
            events=[event],
        )
    assert await store.due_events(now=3000.0) == []
    current = await store.get_job("acct-a", "video_2")
    assert current is not None and current.status == "in_progress"


async def test_one_sender_at_a_time_holds_an_event(store: JobStore) -> None:
    await running(store, "video_3")
    event = job_finished_event("acct-a", "video_3", "video.completed", now=2000.0)
    await store.update_job(
        "acct-a", "video_3", expect_status=("in_progress",), changes={}, events=[event]
    )
    taken = await asyncio.gather(
        *(
            store.claim_event("acct-a", event.id, now=2001.0, claim=f"s{i}", hold_s=60)
            for i in range(5)
        )
    )
    winners = [t for t in taken if t is not None]
    assert len(winners) == 1 and winners[0].due_at == 2061.0
    holder = winners[0].claim
    assert holder is not None
    # held: not due, and no one else may write it back
    assert await store.due_events(now=2030.0) == []
    loser = "s0" if holder != "s0" else "s1"
    assert not await store.finish_event(winners[0], claim=loser, done=True)

    # the holder writes back what is left: due again later, unclaimed
    later = winners[0].model_copy(
        update={
            "due_at": 2100.0,
            "deliveries": {"wh_1": EndpointDelivery(attempts=1, next_attempt_at=2100.0)},
        }
    )
    assert await store.finish_event(later, claim=holder, done=False)
    assert await store.due_events(now=2099.0) == []
    [again] = await store.due_events(now=2100.0)
    assert again.claim is None and again.deliveries == later.deliveries

    # a holder that vanished: after its hold anyone takes the event up again
    first = await store.claim_event("acct-a", event.id, now=2100.0, claim="gone", hold_s=5)
    assert first is not None
    assert await store.claim_event("acct-a", event.id, now=2104.0, claim="next", hold_s=5) is None
    second = await store.claim_event("acct-a", event.id, now=2105.0, claim="next", hold_s=5)
    assert second is not None and second.id == event.id
    assert await store.finish_event(second, claim="next", done=True)
    assert await store.due_events(now=9999.0) == []
    assert not await store.finish_event(second, claim="next", done=True)  # already gone


async def test_every_ending_transition_writes_its_event(store: JobStore) -> None:
    lifecycle = VideoJobLifecycle(store, clock=lambda: 5000.0)
    await running(store, "video_ok")
    await running(store, "video_bad")
    await store.create_job(job("video_late", queue_deadline_at=4000.0))
    await lifecycle.complete("acct-a", "video_ok", 1, artifacts={}, content_ttl_s=60)
    await lifecycle.fail("acct-a", "video_bad", 1, message="boom", content_ttl_s=60)
    late = await store.get_job("acct-a", "video_late")
    assert late is not None
    await lifecycle.expire_in_queue(late, content_ttl_s=60)
    # a transition that does not end the job writes none
    await running(store, "video_on")
    await lifecycle.renew("acct-a", "video_on", 1, lease_s=10, progress=50)

    due = await store.due_events(now=5000.0)
    kinds = sorted((json.loads(e.payload)["data"]["id"], e.type) for e in due)
    assert kinds == [
        ("video_bad", "video.failed"),
        ("video_late", "video.failed"),
        ("video_ok", "video.completed"),
    ]
    assert len({e.id for e in due}) == 3 and all(e.id.startswith("evt_") for e in due)
