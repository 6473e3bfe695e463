"""A simulated request, as the engine follows it and as the real queue holds it."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from deployments.scheduler.queue import Ticket


@dataclass(eq=False, slots=True)
class Request:
    """One logical request: its first attempt and the retries its client sends."""

    rid: int
    account: int
    tier: str
    kind: str
    size: int
    first_at: float
    attempts: int = 0
    attempt_at: float = 0.0
    held: str | None = None  # the quota reservation's id while one is held
    ticket: Ticket[SimJob] | None = None
    outcome: str | None = None


@dataclass(eq=False, slots=True)
class SimJob:
    """A request as the queue sees it (the ``Batchable`` protocol) plus who sent it."""

    account_id: str
    priority_class: int
    batch_key: Hashable
    images: int
    request: Request


class Answer:
    """What a ticket's ``future`` is in simulated time: only whether it is settled (the
    ``Deadlines`` heap drops settled tickets' entries by it)."""

    __slots__ = ("settled",)

    def __init__(self) -> None:
        self.settled = False

    def done(self) -> bool:
        return self.settled
