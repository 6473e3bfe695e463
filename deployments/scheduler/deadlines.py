"""Queued tickets by deadline, apart from the queue discipline they expire from."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Generic

from deployments.scheduler.queue import JobT, Ticket


class Deadlines(Generic[JobT]):
    """Queued tickets by deadline, earliest first, so expiring them costs the due
    entries only (no walk of the queue). A ticket that left the queue keeps its entry
    until its deadline comes up; one whose deadline changed is skipped then."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Ticket[JobT]]] = []
        self._pushes = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, ticket: Ticket[JobT], *, queued: int) -> None:
        heapq.heappush(self._heap, (ticket.deadline, next(self._pushes), ticket))
        if len(self._heap) > 2 * queued + 64:  # answered tickets hold their results
            self._heap = [entry for entry in self._heap if not entry[2].answered]
            heapq.heapify(self._heap)

    def due(self, now: float) -> Iterator[Ticket[JobT]]:
        """Tickets whose deadline is before ``now`` (each once)."""
        while self._heap and self._heap[0][0] < now:
            deadline, _, ticket = heapq.heappop(self._heap)
            if ticket.deadline == deadline:
                yield ticket
