"""The step-level engine of an image worker (issue 17): requests join and leave the
running batch at denoising-step boundaries, and a higher class pauses a lower one
instead of throwing its work away.

A worker replica holds one engine. ``submit`` gives it a job (a seat) and a future
for its images; the engine's thread runs, step after step:

1. admit new seats (prompt encoding and latent preparation: ``Stepper.start``);
2. drop cancelled seats (their caller left, or the scheduler took them back), and
   shed seats that waited their tier's ``max_wait_s`` here without a first step;
3. choose this step's batch: the seats ranked by class (highest first), then by
   arrival, a started seat that has sat out ``max_pauses`` steps in a row ranked above
   every class for one step (so nothing starves, and nothing above it waits more than
   a step for it); the batch is the top seat's shape group, filled in rank
   order up to ``max_batch_images``. Seats left out are paused: they keep their
   latents and scheduler state and resume where they stopped;
4. run one step of the batch (``Stepper.step``: one forward pass);
5. hand finished seats to the decoder, a thread of its own: the VAE decode and the
   conversion to raw pixels happen off the step loop.

The stepper is the model family's loop (``models/stepping``); the engine knows
nothing of torch, nor of images: a seat's job need only say who it is, its class, how
many samples it steps and how long it may wait for a first step (``SeatJob``: an
``ImageJob``, or a video worker's ``VideoSeatJob``), and ``convert`` turns what the
stepper's ``finish`` makes into plain data (raw pixels by default). ``on_step`` is called
on the engine's thread after every step, with the seats that ran in it (a video worker
reports progress and writes checkpoints there).
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
from mediagate.protocol.work import StepEngineStats
from models.encoding import to_raw_image

logger = logging.getLogger(__name__)
RECENT_STEPS_S = 10.0  # the window of the steps per second and occupancy reported


class SteppedState(Protocol):
    @property
    def done(self) -> bool: ...

    @property
    def batch_key(self) -> Hashable: ...


class SeatJob(Protocol):
    """What the engine reads of a job (``ImageJob`` has all of these)."""

    @property
    def request_id(self) -> str: ...

    @property
    def request_key(self) -> str: ...

    @property
    def priority_class(self) -> int: ...

    @property
    def images(self) -> int: ...  # samples it adds to a step's batch

    @property
    def max_wait_s(self) -> float: ...


class Stepper(Protocol):
    """A model family's denoising loop, one step at a time (``models/stepping``)."""

    def start(self, job: Any) -> Any: ...

    def step(self, states: Sequence[Any]) -> None: ...

    def finish(self, state: Any) -> list[Any]: ...

    def held_bytes(self, state: Any) -> int: ...

    def offload(self, state: Any) -> None: ...  # its tensors to host memory

    def reload(self, state: Any) -> None: ...  # ... and back to the model's device


@dataclass(frozen=True)
class SeatOutcome:
    """What a finished seat's future gets."""

    images: list[Any]  # ``convert``ed: raw pixels (images), uint8 frames (a video)
    first_step_wait_s: float  # from its submission to the start of its first step
    service_s: float  # its share of its steps' time (a step of B images: 1/B each)


class SeatCancelled(Exception):
    """The seat was cancelled before its images were made."""


@dataclass(eq=False)
class Seat:
    """One job in the engine."""

    job: SeatJob
    arrival: int
    submitted_at: float
    outcome: concurrent.futures.Future[SeatOutcome] = field(
        default_factory=concurrent.futures.Future
    )
    state: Any = None  # once admitted
    steps_run: int = 0
    pauses: int = 0  # steps sat out in a row since it last ran (after its first)
    first_step_at: float | None = None
    in_last_step: bool = False
    offloaded: bool = False  # its tensors wait in host memory
    service_s: float = 0.0
    cancelled: bool = False


class StepEngine:
    """Runs a ``Stepper`` for every seat it holds, one step at a time, on its own thread."""

    def __init__(
        self,
        stepper: Stepper,
        *,
        max_batch_images: int,
        max_pauses: int = 50,
        max_idle_device_bytes: int | None = None,
        convert: Callable[[Any], Any] = to_raw_image,
        on_step: Callable[[list[Seat]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stepper = stepper
        self.convert = convert
        self.on_step = on_step
        self.max_batch_images = max_batch_images
        self.max_pauses = max_pauses
        self.max_idle_device_bytes = max_idle_device_bytes
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
        self._started_at = clock()
        self._recent_steps: deque[tuple[float, int]] = deque(maxlen=100_000)  # (began, images)

    def submit(self, job: SeatJob) -> concurrent.futures.Future[SeatOutcome]:
        """A seat for ``job``; the future gets its images (or its failure)."""
        seat = Seat(job=job, arrival=next(self._arrivals), submitted_at=self._clock())
        with self._changed:
            if job.request_key in self._by_key:
                raise ValueError(f"request {job.request_id} already has a seat")
            self._by_key[job.request_key] = seat
            self._new.append(seat)
            self._changed.notify()
        return seat.outcome

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
        """Seats held and paused now, and the running counts (operators)."""
        now = self.snapshot()
        return {"seats": now.seats, "paused": now.paused, **dict(self.counts)}

    def run_aside(self, work: Callable[[], None]) -> concurrent.futures.Future[None]:
        """Run ``work`` on the decoder's thread, in turn with the seats' final decodes
        (one thread uses the VAE: a preview decoded there comes before its seat's
        images, and an fp16 VAE's upcast for a decode never races another)."""
        return self._decoder.submit(work)

    def snapshot(self, window_s: float = RECENT_STEPS_S) -> StepEngineStats:
        """What it holds now, and its steps over the last ``window_s`` seconds."""
        now = self._clock()
        with self._changed:
            recent = [images for began, images in self._recent_steps if now - began <= window_s]
            paused = [seat for seat in self._seats if seat.steps_run and not seat.in_last_step]
            paused_bytes = sum(
                self.stepper.held_bytes(seat.state) for seat in paused if not seat.offloaded
            )
            offloaded = [seat for seat in self._seats if seat.offloaded]
            offloaded_bytes = sum(self.stepper.held_bytes(seat.state) for seat in offloaded)
            seats = len(self._seats) + len(self._new)
        span_s = max(1e-9, min(window_s, now - self._started_at))
        return StepEngineStats(
            at=time.time(),
            seats=seats,
            paused=len(paused),
            paused_bytes=paused_bytes,
            offloaded=len(offloaded),
            offloaded_bytes=offloaded_bytes,
            steps_per_s=round(len(recent) / span_s, 3),
            images_per_step=round(sum(recent) / len(recent), 3) if recent else 0.0,
        )

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
            step_started = self._clock()
            try:
                for seat in batch:
                    if seat.offloaded:  # back from host memory for its step
                        self.stepper.reload(seat.state)
                        seat.offloaded = False
                self.stepper.step([seat.state for seat in batch])
            except Exception as error:  # the batch's seats fail; the others go on
                logger.exception("a step failed for %s", [s.job.request_id for s in batch])
                for seat in batch:
                    self._leave(seat, error)
                continue
            self._after_step(batch, step_started, self._clock())
            self._offload_idle()
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
        """Higher first: a seat paused ``max_pauses`` steps in a row, then its class,
        then the earlier arrival."""
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

    def _after_step(self, batch: list[Seat], step_started: float, step_ended: float) -> None:
        """Count the step; a seat's first step counts from when that step began, and
        each image in it is charged an equal share of its time."""
        images = sum(seat.job.images for seat in batch)
        per_image_s = (step_ended - step_started) / images
        self.counts["steps"] += 1
        self.counts["images_stepped"] += images
        with self._changed:
            self._recent_steps.append((step_started, images))
            while step_started - self._recent_steps[0][0] > RECENT_STEPS_S:
                self._recent_steps.popleft()
        in_batch = set(map(id, batch))
        for seat in self._seats:
            seat.in_last_step = id(seat) in in_batch
            if seat.in_last_step:
                seat.pauses = 0
                seat.steps_run += 1
                seat.service_s += per_image_s * seat.job.images
                if seat.first_step_at is None:
                    seat.first_step_at = step_started
                    wait = step_started - seat.submitted_at
                    self.first_step_waits_s.append((seat.job.priority_class, wait))
            elif seat.steps_run:
                seat.pauses += 1
                self.counts["pause_steps"] += 1
        if self.on_step is not None:
            try:
                self.on_step(batch)
            except Exception:  # what it reports is lost; the seats' work is not
                logger.exception("the step hook failed for %s", [s.job.request_id for s in batch])
        for seat in [seat for seat in batch if seat.state.done]:
            with self._changed:
                self._seats.remove(seat)
            self._decoder.submit(self._decode, seat)

    def _offload_idle(self) -> None:
        """Seats that sat out the last step (paused, or not started) keep their tensors
        on the model's device up to ``max_idle_device_bytes`` in all; beyond that the
        lowest-ranked move to host memory until they run again."""
        if self.max_idle_device_bytes is None:
            return
        idle = [seat for seat in self._seats if not seat.in_last_step and not seat.offloaded]
        held = sum(self.stepper.held_bytes(seat.state) for seat in idle)
        for seat in sorted(idle, key=self.rank):  # the last to run again go first
            if held <= self.max_idle_device_bytes:
                break
            held -= self.stepper.held_bytes(seat.state)
            self.stepper.offload(seat.state)
            seat.offloaded = True
            self.counts["offloads"] += 1

    def _decode(self, seat: Seat) -> None:
        try:
            images = [self.convert(made) for made in self.stepper.finish(seat.state)]
        except Exception as error:
            logger.exception("could not decode %s", seat.job.request_id)
            self._forget(seat)
            seat.outcome.set_exception(error)
            return
        self._forget(seat)
        assert seat.first_step_at is not None  # it ran every step
        seat.outcome.set_result(
            SeatOutcome(images, seat.first_step_at - seat.submitted_at, seat.service_s)
        )

    def _leave(self, seat: Seat, error: BaseException) -> None:
        with self._changed:
            if seat in self._seats:
                self._seats.remove(seat)
        self._forget(seat)
        if not seat.outcome.done():
            seat.outcome.set_exception(error)

    def _forget(self, seat: Seat) -> None:
        with self._changed:
            if self._by_key.get(seat.job.request_key) is seat:
                del self._by_key[seat.job.request_key]
