"""The video scheduler's queue: ``FairQueue``'s discipline over queued jobs, found by id.

A video job's record stays in the state store; the queue holds only its place in line
(``QueuedVideo``), so that a job can be taken out of line by id when it is deleted, or
when it expires waiting.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.scheduler.queue import FairQueue, Ticket


@dataclass(frozen=True)
class QueuedVideo:
    """A queued job as the queue discipline sees it (the record stays in the store)."""

    job_id: str
    account_id: str
    priority_class: int


class VideoQueue(FairQueue[QueuedVideo]):
    """Queued video jobs in dispatch order, each at most once, looked up by job id."""

    def __init__(self, min_shares: dict[int, float] | None = None) -> None:
        super().__init__(min_shares)
        self._by_id: dict[str, Ticket[QueuedVideo]] = {}

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._by_id

    def ticket(self, job_id: str) -> Ticket[QueuedVideo] | None:
        return self._by_id.get(job_id)

    def add(
        self,
        video: QueuedVideo,
        *,
        now: float,
        first: bool = False,
        estimated_wait_s: float | None = None,
    ) -> None:
        """Queue ``video`` last in its turn, or ``first`` in line (it was accepted before
        anything queued now)."""
        ticket: Ticket[QueuedVideo] = Ticket(  # nobody awaits it: the job is in the store
            job=video, enqueued_at=now, estimated_wait_s=estimated_wait_s
        )
        self._by_id[video.job_id] = ticket
        if first:
            self.requeue(ticket)
        else:
            self.push(ticket)

    def pop_next(self) -> Ticket[QueuedVideo]:
        """The next job to dispatch (one per slot: video work is never batched)."""
        ticket = self.take_next()
        assert ticket is not None
        del self._by_id[ticket.job.job_id]
        return ticket

    def remove(self, job_id: str) -> bool:
        """Take ``job_id`` out of line; False if it was not queued."""
        ticket = self._by_id.pop(job_id, None)
        return ticket is not None and self.discard(ticket)

    def position_of(self, job_id: str) -> int:
        """1-based place in the queue; 0 when it is not queued."""
        ticket = self._by_id.get(job_id)
        return self.position(ticket) if ticket is not None else 0
