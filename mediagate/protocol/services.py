"""The methods each hop calls on the next through a Ray handle, as Protocols.

A Serve handle is untyped (``handle.submit.remote(job)``), so these are what keeps the
two ends honest: the deployments in ``deployments/`` and the fakes in ``tests/fakes.py``
are both checked against them (by mypy, and at test time by
``tests/unit/test_service_contracts.py``), so a changed shape breaks the fakes' check,
not production. Sync and async are part of the shape: a handle awaits either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from mediagate.protocol.scheduling import PublishedLoad, QueueStats
from mediagate.protocol.work import (
    ImageJob,
    ImageResult,
    PartialImage,
    StreamQueued,
    VideoOutcome,
    VideoTask,
)


class ImageScheduling(Protocol):
    """A model's image scheduler, as routers call it."""

    async def submit(self, job: ImageJob) -> ImageResult:
        """Queue ``job`` and answer when its batch is done (or refuse: ``Overloaded``)."""
        ...

    def submit_streaming(
        self, job: ImageJob
    ) -> AsyncIterator[StreamQueued | PartialImage | ImageResult]:
        """``submit`` for a streamed answer (``handle.options(stream=True)``): queued (or
        refused, raised), then the job's partial images as they are made, then its result."""
        ...

    def withdraw(self, account_id: str, request_id: str) -> bool:
        """Its caller left: whether it had started running (True: its quota is spent)."""
        ...

    def published_load(self, turned_away: dict[int, float] | None = None) -> PublishedLoad:
        """What a router needs to make the admission decision without a hop; it sends
        the slot-seconds per class it refused early since its last read."""
        ...

    def queue_stats(self) -> QueueStats:
        """The queue, for ``GET /v1/status``."""
        ...


class VideoScheduling(Protocol):
    """A model's video scheduler, as routers call it (jobs themselves are in the store)."""

    async def admit(
        self, account_id: str, priority_class: int, max_wait_s: float, max_queued: int | None
    ) -> float | None:
        """The expected wait of a new job, or ``Overloaded`` before anything is stored."""
        ...

    async def enqueue(self, account_id: str, job_id: str, priority_class: int = 0) -> int:
        """Queue a stored job; its 1-based place."""
        ...

    async def cancel(self, account_id: str, job_id: str) -> bool:
        """Drop a deleted job from the queue."""
        ...

    def position(self, job_id: str) -> int:
        """1-based place in the queue; 0 when not queued here."""
        ...

    def queue_stats(self) -> QueueStats:
        """The queue, for ``GET /v1/status``."""
        ...


class ImageWorking(Protocol):
    """An image worker replica, as its scheduler calls it."""

    async def generate(self, jobs: list[ImageJob]) -> list[ImageResult]:
        """One pipeline call for a batch of same-shape jobs; results in the jobs' order."""
        ...

    def generate_streaming(
        self, jobs: list[ImageJob]
    ) -> AsyncIterator[PartialImage | list[ImageResult]]:
        """``generate``, streamed: partial images as the steps make them, then the results."""
        ...


class VideoWorking(Protocol):
    """A video worker replica, as its scheduler calls it."""

    async def run(self, task: VideoTask) -> VideoOutcome:
        """One attempt of one job; its record in the store says the rest."""
        ...
