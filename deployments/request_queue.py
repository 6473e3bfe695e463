"""The scheduler's queue discipline, kept apart from Ray so it can be tested alone.

FIFO for now; the priority issue replaces ``take_batch``'s choice of head with
tier classes and per-account fairness behind the same interface.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


class Batchable(Protocol):
    @property
    def batch_key(self) -> Hashable: ...

    @property
    def images(self) -> int: ...


JobT = TypeVar("JobT", bound=Batchable)


@dataclass(eq=False)
class Ticket(Generic[JobT]):
    """A queued job and the future its submitter awaits."""

    job: JobT
    enqueued_at: float
    future: asyncio.Future[Any] = field(repr=False)


class FifoQueue(Generic[JobT]):
    """First come, first served; batches gather later tickets of the head's shape."""

    def __init__(self) -> None:
        self._tickets: list[Ticket[JobT]] = []

    def __len__(self) -> int:
        return len(self._tickets)

    def push(self, ticket: Ticket[JobT]) -> None:
        self._tickets.append(ticket)

    def discard(self, ticket: Ticket[JobT]) -> bool:
        """Remove a ticket whose submitter went away; ``False`` if it was not queued."""
        try:
            self._tickets.remove(ticket)
        except ValueError:
            return False
        return True

    def head(self) -> Ticket[JobT] | None:
        return self._tickets[0] if self._tickets else None

    def batch_images_available(self, max_images: int) -> int:
        """How many images ``take_batch(max_images)`` would return now."""
        return sum(ticket.job.images for ticket in self._plan_batch(max_images))

    def take_batch(self, max_images: int) -> list[Ticket[JobT]]:
        """Remove and return the head plus later same-shape tickets, up to ``max_images``.

        The head is always taken, even when it alone exceeds ``max_images``.
        """
        batch = self._plan_batch(max_images)
        taken = {id(ticket) for ticket in batch}
        self._tickets = [ticket for ticket in self._tickets if id(ticket) not in taken]
        return batch

    def _plan_batch(self, max_images: int) -> list[Ticket[JobT]]:
        if not self._tickets:
            return []
        head = self._tickets[0]
        batch = [head]
        images = head.job.images
        for ticket in self._tickets[1:]:
            if images >= max_images:
                break
            if (
                ticket.job.batch_key == head.job.batch_key
                and images + ticket.job.images <= max_images
            ):
                batch.append(ticket)
                images += ticket.job.images
        return batch
