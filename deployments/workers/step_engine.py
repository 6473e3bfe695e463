"""The step-level engine of an image worker (issue 17): requests join and leave the
running batch at denoising-step boundaries, and a higher class pauses a lower one
instead of throwing its work away.

A worker replica holds one engine. ``submit`` gives it a job (a seat) and a future
for its images; the engine's thread runs, step after step:

1. admit new seats (prompt encoding and latent preparation: ``Stepper.start``);
2. drop cancelled seats (their caller left, or the scheduler took them back), and
   shed seats that waited their tier's ``max_wait_s`` here without a first step;
3. choose this step's batch: the seats ranked by class (highest first), then by
   arrival, a seat that has sat out ``max_pauses`` steps ranked above every class
   (so nothing starves); the batch is the top seat's shape group, filled in rank
   order up to ``max_batch_images``. Seats left out are paused: they keep their
   latents and scheduler state and resume where they stopped;
4. run one step of the batch (``Stepper.step``: one forward pass);
5. hand finished seats to the decoder, a thread of its own: the VAE decode and the
   conversion to raw pixels happen off the step loop.

The stepper is the model family's loop (``models/stepping``); the engine knows
nothing of torch. Only plain data leaves it (``RawImage``).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mediagate.protocol.errors import Overloaded
from mediagate.protocol.work import ImageJob, RawImage
from models.encoding import to_raw_image

logger = logging.getLogger(__name__)


class SteppedState(Protocol):
    @property
    def done(self) -> bool: ...

    @property
    def batch_key(self) -> Hashable: ...


class Stepper(Protocol):
    """A model family's denoising loop, one step at a time (``models/stepping``)."""

    def start(self, job: ImageJob) -> Any: ...

    def step(self, states: Sequence[Any]) -> None: ...

    def finish(self, state: Any) -> list[Any]: ...


class SeatCancelled(Exception):
    """The seat was cancelled before its images were made."""


@dataclass(eq=False)
class Seat:
    """One job in the engine."""

    job: ImageJob
    arrival: int
    submitted_at: float
    images: concurrent.futures.Future[list[RawImage]] = field(
        default_factory=concurrent.futures.Future
    )
    state: Any = None  # once admitted
    steps_run: int = 0
    pauses: int = 0  # steps sat out after its first
    first_step_at: float | None = None
    cancelled: bool = False


class StepEngine:
    """Runs a ``Stepper`` for every seat it holds, one step at a time, on its own thread."""

    def __init__(
        self,
        stepper: Stepper,
        *,
        max_batch_images: int,
        max_pauses: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stepper = stepper
        self.max_batch_images = max_batch_images
        self.max_pauses = max_pauses
        self._clock = clock
        self._arrivals = itertools.count()
        self._changed = threading.Condition()
        self._new: list[Seat] = []
        self._seats: list[Seat] = []  # admitted
        self._by_key: dict[str, Seat] = {}
        self._stopping = False
        self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode")
        self._thread = threading.Thread(target=self._run, name="step-engine", daemon=True)
        self._thread.start()
        self.counts: Counter[str] = Counter()  # steps, images stepped, pauses, ...
        # (class, seconds from submit to first step) of the last 1000 seats
        self.first_step_waits_s: deque[tuple[int, float]] = deque(maxlen=1000)

    def submit(self, job: ImageJob) -> concurrent.futures.Future[list[RawImage]]:
        """A seat for ``job``; the future gets its images (or its failure)."""
        seat = Seat(job=job, arrival=next(self._arrivals), submitted_at=self._clock())
        with self._changed:
            if job.request_key in self._by_key:
                raise ValueError(f"request {job.request_id} already has a seat")
            self._by_key[job.request_key] = seat
            self._new.append(seat)
            self._changed.notify()
        return seat.images

    def cancel(self, request_key: str) -> bool:
        """Take a seat out at the next step boundary; whether it was there."""
        with self._changed:
            seat = self._by_key.get(request_key)
            if seat is None:
                return False
            seat.cancelled = True
            self._changed.notify()
        return True

    def stats(self) -> dict[str, Any]:
        with self._changed:
            paused = sum(1 for seat in self._seats if seat.pauses and seat.steps_run)
            return {
                "seats": len(self._seats) + len(self._new),
                "paused": paused,
                **dict(self.counts),
            }

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join(timeout=30)
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._stopping and not (self._new or self._seats):
                    self._changed.wait()
                if self._stopping:
                    break
                arrivals, self._new = self._new, []
            for seat in arrivals:
                self._admit(seat)
            self._drop_cancelled()
            batch = self.choose_batch(self._seats)
            if not batch:
                continue
            try:
                self.stepper.step([seat.state for seat in batch])
            except Exception as error:  # the batch's seats fail; the others go on
                logger.exception("a step failed for %s", [s.job.request_id for s in batch])
                for seat in batch:
                    self._leave(seat, error)
                continue
            self._after_step(batch)
        for seat in [*self._seats, *self._new]:
            self._leave(seat, SeatCancelled("the worker is stopping"))

    def _admit(self, seat: Seat) -> None:
        if seat.cancelled:
            self._leave(seat, SeatCancelled("cancelled before it started"))
            return
        try:
            seat.state = self.stepper.start(seat.job)
        except Exception as error:
            logger.exception("could not start %s", seat.job.request_id)
            self._leave(seat, error)
            return
        with self._changed:
            self._seats.append(seat)

    def _drop_cancelled(self) -> None:
        """Cancelled seats leave; so do seats that waited their tier's longest wait
        without a first step (higher classes kept them out): shed, to retry later."""
        now = self._clock()
        for seat in list(self._seats):
            if seat.cancelled:
                self.counts["cancelled"] += 1
                self._leave(seat, SeatCancelled("cancelled at a step boundary"))
            elif seat.first_step_at is None and now - seat.submitted_at > seat.job.max_wait_s:
                self.counts["shed_unstarted"] += 1
                waited_s = now - seat.submitted_at
                self._leave(
                    seat,
                    Overloaded(
                        "the service is busy: your request waited longer than your tier "
                        "allows; please retry later",
                        retry_after_s=max(1.0, waited_s),
                    ),
                )

    def rank(self, seat: Seat) -> tuple[bool, int, int]:
        """Higher first: a seat paused ``max_pauses`` times, then its class, then the
        earlier arrival."""
        return (seat.pauses >= self.max_pauses, seat.job.priority_class, -seat.arrival)

    def choose_batch(self, seats: Sequence[Seat]) -> list[Seat]:
        """This step's batch: the top-ranked seat's shape group, in rank order, up to
        ``max_batch_images`` (a seat larger than that runs alone)."""
        ranked = sorted(seats, key=self.rank, reverse=True)
        if not ranked:
            return []
        key = ranked[0].state.batch_key
        batch: list[Seat] = []
        images = 0
        for seat in ranked:
            if seat.state.batch_key != key:
                continue
            if batch and images + seat.job.images > self.max_batch_images:
                continue
            batch.append(seat)
            images += seat.job.images
        return batch

    def _after_step(self, batch: list[Seat]) -> None:
        now = self._clock()
        self.counts["steps"] += 1
        self.counts["images_stepped"] += sum(seat.job.images for seat in batch)
        in_batch = set(map(id, batch))
        for seat in self._seats:
            if id(seat) in in_batch:
                seat.steps_run += 1
                if seat.first_step_at is None:
                    seat.first_step_at = now
                    wait = now - seat.submitted_at
                    self.first_step_waits_s.append((seat.job.priority_class, wait))
            elif seat.steps_run:
                seat.pauses += 1
                self.counts["pause_steps"] += 1
        for seat in [seat for seat in batch if seat.state.done]:
            with self._changed:
                self._seats.remove(seat)
            self._decoder.submit(self._decode, seat)

    def _decode(self, seat: Seat) -> None:
        try:
            images = [to_raw_image(image) for image in self.stepper.finish(seat.state)]
        except Exception as error:
            logger.exception("could not decode %s", seat.job.request_id)
            self._forget(seat)
            seat.images.set_exception(error)
            return
        self._forget(seat)
        seat.images.set_result(images)

    def _leave(self, seat: Seat, error: BaseException) -> None:
        with self._changed:
            if seat in self._seats:
                self._seats.remove(seat)
        self._forget(seat)
        if not seat.images.done():
            seat.images.set_exception(error)

    def _forget(self, seat: Seat) -> None:
        with self._changed:
            if self._by_key.get(seat.job.request_key) is seat:
                del self._by_key[seat.job.request_key]
