"""Streamed image answers (``stream: true``): previews as the image forms, then the images.

Everything that can refuse the request happens before the first byte, so refusals
keep their HTTP status (429 with Retry-After, 400, 503): the tier checks and the
published-load refusal (``ImageRequests.generation``/``edit``), the quota reservation,
the uploads' decode, and the scheduler's own admission (its first streamed item). Then
the events: a comment saying the request is queued, each partial image as the worker
decodes it, and one completed event per image. A failure after that is an ``error``
event. The quota is settled as for unary answers: charged for images delivered, or for
work that had started when the caller left; given back otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError

from deployments.router.images import ImageRequests, ImageWork
from deployments.router.live_schedulers import on_live_scheduler, started_before_leaving
from deployments.streams import finish_regardless
from mediagate.access.accounts import Account
from mediagate.access.guard import Admission, rate_limit_headers
from mediagate.protocol.errors import GenerationFailed, ModerationBlocked, caused_by
from mediagate.protocol.image_stream import (
    ImageStreamEvent,
    ImagesUsage,
    completed_event_type,
    partial_event_type,
    sse,
    sse_comment,
    sse_error,
)
from mediagate.protocol.work import ImageResult, PartialImage, RawImage, StreamQueued

logger = logging.getLogger(__name__)
# What a handle call raises when the request that made it was cancelled.
CANCELLED = (RequestCancelledError, TaskCancelledError)


async def start_image_stream(
    requests: ImageRequests, account: Account, work: ImageWork
) -> tuple[PrimedEvents, dict[str, str]]:
    """Reserve the quota and queue the job; the events to send (already started: see
    ``PrimedEvents``) and the answer's headers. Raises if the request is refused
    (nothing reserved then)."""
    gateway = requests.gateway
    admission = await gateway.guard.admit(account, kind="image", units=work.job.images)
    stream = ImageStream(requests, account, work, admission)
    try:
        job = await work.inputs() if work.inputs is not None else work.job

        async def queue_on(scheduler: Any) -> Any:
            stream.scheduler = scheduler  # (asked, if its caller leaves, whether it started)
            stream.scheduled = scheduler.options(stream=True).submit_streaming.remote(job)
            return await stream.scheduled.__anext__()  # StreamQueued, or its refusal

        queued = await on_live_scheduler(lambda: gateway.schedulers, work.spec.id, queue_on)
    except BaseException as error:
        queued_already = stream.scheduled is not None
        if queued_already:
            stream.scheduled.cancel()
        left = not isinstance(error, Exception) or caller_went_away(error)
        # a caller gone while its ticket was queued may have been dispatched already
        await finish_regardless(stream.settle(charge=False, left=left and queued_already))
        if isinstance(error, Exception) and not left:
            raise requests.scheduler_error(work.spec.id, error) from None
        raise
    events_out = stream.events(queued)
    first = await events_out.__anext__()  # started: closing it now runs its cleanup
    return PrimedEvents(first, events_out), rate_limit_headers(admission.usage)


def caller_went_away(error: BaseException) -> bool:
    """A handle call that ended because its caller's request was cancelled (Serve
    cancels the calls a cancelled request made): the caller left, nothing failed."""
    return caused_by(error, CANCELLED)


class PrimedEvents:
    """A started event generator, with its first chunk held back to be sent first.

    An async generator closed before it started does not run its ``finally``: a
    client gone between admission and the first byte would leave its quota reserved
    and its job queued for nobody. Started here, ``aclose()`` always settles."""

    def __init__(self, first: bytes, rest: AsyncGenerator[bytes, None]) -> None:
        self._first: bytes | None = first
        self._rest = rest

    def __aiter__(self) -> PrimedEvents:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        await self._rest.aclose()


class ImageStream:
    """One streamed request after its admission: relays the scheduler's items as events
    and settles the quota however the stream ends."""

    def __init__(
        self,
        requests: ImageRequests,
        account: Account,
        work: ImageWork,
        admission: Admission,
    ) -> None:
        self.requests = requests
        self.account = account
        self.work = work
        self.job = work.job  # (its decoded uploads go to the scheduler, not kept here)
        self.admission = admission
        self.scheduler: Any = None  # the scheduler it was sent to (last), once sent
        self.scheduled: Any = None  # the scheduler's DeploymentResponseGenerator, once sent

    async def events(self, queued: StreamQueued) -> AsyncGenerator[bytes, None]:
        delivered = done = left = False
        try:
            wait = queued.estimated_wait_s
            yield sse_comment("queued" if wait is None else f"queued; expected wait {wait:.1f} s")
            result: ImageResult | None = None
            async for item in self.scheduled:
                if isinstance(item, PartialImage):
                    await self._moderate([item.image])  # a preview shows what is coming
                    yield await self._event(item.image, item.image_index, item.partial_image_index)
                elif isinstance(item, ImageResult):
                    result = item
            if result is None:
                raise GenerationFailed("the stream ended without its images; please retry")
            self.requests.refresh_load_now(self.work.spec.id)
            await self._moderate(result.images)  # all of them, before the first goes out
            done = True  # the work is done: a caller who leaves now has had it
            for index, image in enumerate(result.images):
                yield await self._event(image, index, None)
            delivered = True
        except (asyncio.CancelledError, GeneratorExit):
            left = True
            raise
        except Exception as error:
            if caller_went_away(error):
                left = True
                raise
            done = False  # failed on our side (encoding included), or refused: not charged
            if isinstance(error, ModerationBlocked):  # counted as the edge counts its 400s
                self.requests.gateway.on_refusal(self.account.tier, error.code or "")
            yield sse_error(self.requests.scheduler_error(self.work.spec.id, error))
        finally:
            if not delivered:
                self.scheduled.cancel()  # no-op once it ended; else its ticket leaves
            await finish_regardless(self.settle(charge=delivered or done, left=left))

    async def settle(self, *, charge: bool, left: bool) -> None:
        """Commit or release the reservation; a caller who left is charged if its work
        had started (its scheduler says)."""
        try:
            if left and not charge:  # it may have started running: ask its scheduler
                charge = await started_before_leaving(
                    self.scheduler, self.account.id, self.job.request_id
                )
        finally:
            await self.requests.gateway.guard.settle(self.admission, charge=charge)

    async def _moderate(self, images: list[RawImage]) -> None:
        """Refuse (an ``error`` event, nothing charged) if the checker flags one."""
        processing = self.requests.gateway.image_processing
        await processing.check(images, self.work.moderation, param=None)

    async def _event(self, image: RawImage, image_index: int, partial: int | None) -> bytes:
        """An image as an event (encoded off the event loop)."""
        delivery, kind = self.work.delivery, self.work.kind
        try:
            # the final image carries its manifest; partial ones are previews, unsigned
            encoded = await self.requests.gateway.image_processing.encode(
                image,
                delivery.encoding(inline=True),
                self.work.provenance if partial is None else None,
            )
        except Exception as error:
            logger.exception("could not encode a streamed image of %s", self.job.request_id)
            raise GenerationFailed("the image could not be encoded; please retry") from error
        event = ImageStreamEvent(
            type=completed_event_type(kind) if partial is None else partial_event_type(kind),
            b64_json=encoded.decode(),
            created_at=int(self.requests.gateway.clock()),
            size=f"{self.job.width}x{self.job.height}",
            quality=self.work.spec.quality_of(self.job.num_inference_steps),
            output_format=delivery.output_format,
            image_index=image_index,
            partial_image_index=partial,
            usage=ImagesUsage() if partial is None else None,
        )
        return sse(event)
