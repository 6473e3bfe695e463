"""Fakes of the deployments, the only place they live. Each implements the Protocol of
``mediagate.protocol.services`` its real counterpart does (checked by mypy and by
``tests/unit/test_service_contracts.py``); hand one to the code under test behind a
``LocalHandle``, as Serve hands it a deployment handle."""

from __future__ import annotations

import asyncio
import inspect
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

from mediagate.protocol.errors import MediagateError
from mediagate.protocol.scheduling import PublishedLoad, QueueStats
from mediagate.protocol.work import (
    ImageJob,
    ImageResult,
    PartialImage,
    RawImage,
    StreamQueued,
    VideoOutcome,
    VideoTask,
)


def solid_raw(width: int, height: int, seed: int) -> RawImage:
    """An image as a worker returns it: one colour, raw RGB pixels."""
    return RawImage(
        mode="RGB", width=width, height=height, pixels=bytes((seed % 256, 0, 0)) * width * height
    )


def solid_png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (seed % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


class _Method:
    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function

    def remote(self, *args: Any, **kwargs: Any) -> FakeResponse:
        return FakeResponse(self._function(*args, **kwargs))


class LocalHandle:
    """A deployment object (real or fake) behind a handle's interface: each
    ``handle.method.remote(...)`` starts the call at once and gives back an awaitable
    ``FakeResponse`` that can be cancelled, as Serve's ``DeploymentResponse``; sync and
    async methods alike."""

    def __init__(self, target: object) -> None:
        self.target = target

    def __getattr__(self, name: str) -> _Method:
        method = getattr(self.target, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return _Method(call)

    def options(self, *, stream: bool = False) -> Any:
        return _StreamingHandle(self.target) if stream else self


class _StreamingHandle:
    """``handle.options(stream=True)``: each call gives a ``FakeResponseGenerator``."""

    def __init__(self, target: object) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.target, name)

        class _StreamingMethod:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> FakeResponseGenerator:
                return FakeResponseGenerator(method(*args, **kwargs))

        return _StreamingMethod()


class FakeResponseGenerator:
    """Like Serve's DeploymentResponseGenerator: the callee's async generator runs in a
    task of its own (it does not wait for the caller to read), the caller iterates what
    it yielded, and ``cancel()`` makes the caller see ``RequestCancelledError`` (the
    callee sees ``CancelledError``)."""

    _END = object()

    def __init__(self, generator: Any) -> None:
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled_by_caller = False
        self._task = asyncio.ensure_future(self._pump(generator))

    async def _pump(self, generator: Any) -> None:
        try:
            async for item in generator:
                self._items.put_nowait((item, None))
        except BaseException as error:
            self._items.put_nowait((self._END, error))
            raise
        self._items.put_nowait((self._END, None))

    def cancel(self) -> None:
        self._cancelled_by_caller = True
        self._task.cancel()

    def __aiter__(self) -> FakeResponseGenerator:
        return self

    async def __anext__(self) -> Any:
        from ray.serve.exceptions import RequestCancelledError

        item, error = await self._items.get()
        if item is not self._END:
            return item
        if self._cancelled_by_caller or isinstance(error, asyncio.CancelledError):
            raise RequestCancelledError("fake")
        if error is not None:
            raise error
        raise StopAsyncIteration


class FakeScheduler:
    """An image scheduler (``ImageScheduling``) that answers at once, recording every job;
    ``fail_with`` makes it raise instead."""

    def __init__(self, *, fail_with: MediagateError | Exception | None = None) -> None:
        self.jobs: list[ImageJob] = []
        self.fail_with = fail_with
        self.load = PublishedLoad(busy=0, slots=1, service_s={})
        self.withdrawn: list[str] = []  # request ids whose callers left
        self.started_when_withdrawn = False  # what withdraw answers
        self.turned_away: list[dict[int, float]] = []  # what routers sent with load reads

    def withdraw(self, account_id: str, request_id: str) -> bool:
        self.withdrawn.append(request_id)
        return self.started_when_withdrawn

    def published_load(self, turned_away: dict[int, float] | None = None) -> PublishedLoad:
        if turned_away:
            self.turned_away.append(turned_away)
        return self.load

    def queue_stats(self) -> QueueStats:
        return QueueStats(
            queue_len=4,
            queue_by_class={0: 3, 2: 1},
            running_by_class={2: 1},
            busy_slots=1,
            capacity=1,
            replicas=1,
            wait_estimate_s_by_class={0: 12.5, 2: 0.5},
            wait_beyond_estimate_s_by_class={0: {"p50": -0.5, "p99": 2.0}},
            decision_counts={"admitted_class_0": 10, "shed_class_0": 7, "admitted_class_2": 3},
        )

    async def submit(self, job: ImageJob) -> ImageResult:
        self.jobs.append(job)
        if self.fail_with is not None:
            raise self.fail_with
        images = [solid_raw(job.width, job.height, job.seed + i) for i in range(job.images)]
        return ImageResult(
            request_id=job.request_id,
            images=images,
            batch_images=job.images,
            inference_s=0.0,
        )

    async def submit_streaming(
        self, job: ImageJob
    ) -> AsyncIterator[StreamQueued | PartialImage | ImageResult]:
        """Queued, then every partial image ``job`` asks for (image i's preview p is
        shaded ``seed + i + 100 * (p + 1)``), then ``submit``'s answer."""
        self.jobs.append(job)
        if self.fail_with is not None:
            raise self.fail_with
        yield StreamQueued(estimated_wait_s=0.0)
        for preview in range(job.partial_images):
            for image in range(job.images):
                shade = job.seed + image + 100 * (preview + 1)
                yield PartialImage(
                    job_index=0,
                    image_index=image,
                    partial_image_index=preview,
                    image=solid_raw(job.width, job.height, shade),
                )
        self.jobs.pop()  # submit records it again
        yield await self.submit(job)


class FakeResponse:
    """Like Serve's DeploymentResponse: awaitable, and ``cancel()`` makes the awaiting
    caller see ``RequestCancelledError`` (the worker sees ``CancelledError``)."""

    def __init__(self, coroutine: Any) -> None:
        self._task = asyncio.ensure_future(coroutine)
        self._cancelled_by_caller = False

    def cancel(self) -> None:
        self._cancelled_by_caller = True
        self._task.cancel()

    def __await__(self) -> Any:
        return self._result().__await__()

    async def _result(self) -> Any:
        from ray.serve.exceptions import RequestCancelledError

        try:
            return await self._task
        except asyncio.CancelledError:
            if self._cancelled_by_caller:
                raise RequestCancelledError("fake") from None
            raise


class FakeImageWorker:
    """An image worker (``ImageWorking``) whose batches finish only when the test
    releases them."""

    def __init__(self) -> None:
        self.batches: list[list[ImageJob]] = []
        self.stopped: list[list[str]] = []  # request ids of batches taken back mid-way
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self._arrived = asyncio.Condition()
        self.service_s: float | None = None  # what a step-level worker reports per job

    async def generate(self, jobs: list[ImageJob]) -> list[ImageResult]:
        try:
            return await self._generate(jobs)
        except asyncio.CancelledError:
            self.stopped.append([job.request_id for job in jobs])
            raise

    async def generate_streaming(
        self, jobs: list[ImageJob]
    ) -> AsyncIterator[PartialImage | list[ImageResult]]:
        """One partial image per preview each job asks for, made at once; the results
        when the test releases the batch."""
        for job_index, job in enumerate(jobs):
            for preview in range(job.partial_images):
                for image in range(job.images):
                    yield PartialImage(
                        job_index=job_index,
                        image_index=image,
                        partial_image_index=preview,
                        image=solid_raw(1, 1, preview),
                    )
        yield await self.generate(jobs)

    async def wait_for_batches(self, count: int) -> None:
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.batches) >= count)

    async def _generate(self, jobs: list[ImageJob]) -> list[ImageResult]:
        self.batches.append(list(jobs))
        self.started.set()
        async with self._arrived:
            self._arrived.notify_all()
        await self.release.wait()
        return [
            ImageResult(
                request_id=job.request_id,
                images=[solid_raw(1, 1, 0)] * job.images,
                batch_images=sum(j.images for j in jobs),
                inference_s=0.0,
                service_s=self.service_s,
            )
            for job in jobs
        ]


class FakeClock:
    """A clock that only the test moves.

    By default it starts at 08:00 UTC of the first day at least an hour after the real
    time: never behind what real-time things wrote just before (an account created on
    the real clock, SQLite's expiry, a file's mtime), whatever today's date, and always
    16 hours before a UTC midnight, so moving it a few hours stays in one quota day.
    """

    def __init__(self, now: float | None = None) -> None:
        if now is None:
            import time

            day_s, eight_s = 86_400, 8 * 3_600
            earliest = time.time() + 3_600
            days = -(-(earliest - eight_s) // day_s)  # rounded up
            now = days * day_s + eight_s
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeVideoScheduler:
    """A video scheduler (``VideoScheduling``) that records its calls; ``admit_raises``
    makes ``admit`` refuse (``Overloaded``) or fail (an unreachable scheduler).
    ``attempts`` names every admit/enqueue call, also those an unreachable scheduler
    fails."""

    def __init__(self, *, unreachable: bool = False) -> None:
        self.attempts: list[str] = []
        self.admissions: list[tuple[str, int, float, int | None]] = []
        self.admit_raises: Exception | None = None
        self.enqueued: list[tuple[str, str]] = []
        self.cancelled: list[tuple[str, str]] = []
        self.unreachable = unreachable

    def position(self, job_id: str) -> int:
        cancelled = {queued for _, queued in self.cancelled}
        waiting = [queued for _, queued in self.enqueued if queued not in cancelled]
        return waiting.index(job_id) + 1 if job_id in waiting else 0

    def queue_stats(self) -> QueueStats:
        return QueueStats(
            queue_len=2,
            queue_by_class={1: 2},
            running_by_class={2: 1},
            busy_slots=1,
            capacity=1,
            replicas=1,
            wait_estimate_s_by_class={1: 90.0, 2: 30.0},
            decision_counts={"admitted_class_1": 2, "admitted_class_2": 1},
        )

    async def admit(
        self, account_id: str, priority_class: int, max_wait_s: float, max_queued: int | None
    ) -> float | None:
        self.attempts.append("admit")
        if self.unreachable:
            raise ConnectionError("scheduler unreachable")
        self.admissions.append((account_id, priority_class, max_wait_s, max_queued))
        if self.admit_raises is not None:
            raise self.admit_raises
        return None

    async def enqueue(self, account_id: str, job_id: str, priority_class: int = 0) -> int:
        self.attempts.append("enqueue")
        if self.unreachable:
            raise ConnectionError("scheduler unreachable")
        self.enqueued.append((account_id, job_id))
        return len(self.enqueued)

    async def cancel(self, account_id: str, job_id: str) -> bool:
        self.cancelled.append((account_id, job_id))
        return True


class FakeVideoWorker:
    """A video worker (``VideoWorking``) that the test steers.

    Each call waits until the test calls ``finish(job_id)`` (completes the job in the
    store, then commits its quota reservation, as the real worker does) or ``die(job_id)``
    (the call raises, as a killed replica's does).
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.unreachable = False
        self.tasks: list[VideoTask] = []
        self.started = asyncio.Event()
        self._outcomes: dict[str, asyncio.Future[str]] = {}

    def running(self) -> list[str]:
        return [job_id for job_id, future in self._outcomes.items() if not future.done()]

    async def wait_running(self, count: int) -> None:
        while len(self.running()) < count:
            self.started.clear()
            await self.started.wait()

    def finish(self, job_id: str) -> None:
        self._outcomes[job_id].set_result("completed")

    def die(self, job_id: str) -> None:
        self._outcomes[job_id].set_result("died")

    async def run(self, task: VideoTask) -> VideoOutcome:
        from mediagate.jobs.video import VideoJobLifecycle

        if self.unreachable:  # like a handle still routing to a replica that just died
            self.tasks.append(task)
            raise RuntimeError("ActorUnavailableError: the replica is gone")
        jobs = VideoJobLifecycle(self.store)  # the transitions the real worker makes
        await jobs.renew(task.account_id, task.job_id, task.attempt, lease_s=60, starting=True)
        self.tasks.append(task)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._outcomes[task.job_id] = future
        self.started.set()
        result = await future
        if result == "died":
            raise RuntimeError("ActorDiedError: the replica died")
        done = await jobs.complete(  # and the quota committed, as for the real worker
            task.account_id, task.job_id, task.attempt, artifacts={"video": "x"}, content_ttl_s=60
        )
        return VideoOutcome(job_id=task.job_id, status="completed" if done else "cancelled")
