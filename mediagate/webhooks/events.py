"""Events as the outbox keeps them: built in the transition that finishes a job."""

from __future__ import annotations

import secrets

from mediagate.protocol.webhooks import EventData, EventType, WebhookEvent
from mediagate.stores.records import OutboxEvent


def job_finished_event(account_id: str, job_id: str, type_: EventType, now: float) -> OutboxEvent:
    """``video.completed`` or ``video.failed`` for ``job_id``, due at once; its body is
    fixed here, so every attempt sends (and signs) the same bytes."""
    event = WebhookEvent(
        id=f"evt_{secrets.token_hex(12)}",
        created_at=int(now),
        type=type_,
        data=EventData(id=job_id),
    )
    return OutboxEvent(
        id=event.id,
        account_id=account_id,
        type=type_,
        payload=event.model_dump_json(),
        created_at=now,
        due_at=now,
    )
