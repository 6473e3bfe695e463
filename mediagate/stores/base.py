"""The state store's interface: one contract, an embedded and a production backend.

Every method is a coroutine. Updates are compare-and-set (``update_job`` names the
statuses, and optionally the attempt, it expects), so a worker that lost its lease, a
scheduler that restarted and a user who deleted the job can never overwrite one
another's decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal, Protocol, TypeVar

from mediagate.stores.records import OutboxEvent, VideoJobRecord

ListOrder = Literal["asc", "desc"]


T = TypeVar("T")


# Reads an account document (None if absent), returns its new text (None deletes it)
# and a result for the caller. It must be pure: a backend may call it more than once.
DocumentChange = Callable[[str | None], tuple[str | None, T]]


class JobStore(Protocol):
    """Durable video jobs."""

    async def create_job(self, job: VideoJobRecord) -> None:
        """Insert a new job (its id must be new)."""

    async def get_job(self, account_id: str, job_id: str) -> VideoJobRecord | None:
        """The job if it exists *and* belongs to ``account_id``."""

    async def list_jobs(
        self, account_id: str, *, after: str | None, limit: int, order: ListOrder
    ) -> tuple[list[VideoJobRecord], bool]:
        """A page of the account's jobs by creation time, and whether more follow."""

    async def update_job(
        self,
        account_id: str,
        job_id: str,
        *,
        expect_status: Collection[str],
        expect_attempt: int | None = None,
        changes: dict[str, Any],
        events: Sequence[OutboxEvent] = (),
    ) -> VideoJobRecord | None:
        """Apply ``changes`` atomically if the job is in an expected state; else ``None``.
        ``events`` (of the same account) join the outbox in the same transaction: written
        if and only if the change is."""

    async def delete_job(self, account_id: str, job_id: str) -> VideoJobRecord | None:
        """Remove the job; returns what was removed, ``None`` if there was nothing."""

    async def active_jobs(self, model: str) -> list[VideoJobRecord]:
        """Queued and in-progress jobs of ``model``, oldest first (for recovery)."""

    async def expired_jobs(self, now: float, limit: int = 100) -> list[VideoJobRecord]:
        """Finished jobs whose content expired at or before ``now``."""

    async def due_events(self, now: float, limit: int = 100) -> list[OutboxEvent]:
        """Outbox events due at or before ``now``, soonest first (to be claimed)."""

    async def claim_event(
        self, account_id: str, event_id: str, *, now: float, claim: str, hold_s: float
    ) -> OutboxEvent | None:
        """Take a due event for ``hold_s`` (``due_at`` moves there, ``claim`` names the
        taker); ``None`` if it is gone or not due (another sender has it)."""

    async def finish_event(self, event: OutboxEvent, *, claim: str, done: bool) -> bool:
        """Write back an event ``claim`` holds: removed when ``done``, else stored as given
        (its next ``due_at``, no claim). ``False`` if the claim was lost meanwhile."""

    async def mutate(
        self, account_id: str, name: str, change: DocumentChange[T], *, ttl_s: float | None = None
    ) -> T:
        """Atomically read, change and write the account's document ``name``.

        The quota ledger and idempotency records are such documents: one per account
        (or per account and key), so every update is a single-slot transaction.
        ``ttl_s`` lets the backend drop the document after that long untouched.
        """

    async def purge_expired_documents(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` account documents whose TTL has passed (a backend that
        expires them by itself returns 0); returns how many."""

    async def close(self) -> None:
        """Release connections."""
