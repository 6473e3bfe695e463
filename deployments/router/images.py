"""Image requests as the router handles them, generations and edits alike.

A request is resolved into an ``ImageJob`` against its model and tier; refused at once
when the model's scheduler (by the load it last published) would refuse it; admitted
by the quota guard; handed to the scheduler; and its images encoded and inlined or
stored. The quota is settled by what was done: charged for images delivered, or for
work that had started when its caller left; given back otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.router.edit_uploads import (
    EditUploads,
    check_edit_uploads,
    decode_edit_inputs,
    edit_strength,
    edit_upload_limits,
)
from deployments.router.image_delivery import Delivery, deliver
from deployments.router.live_schedulers import on_live_scheduler, started_before_leaving
from deployments.router.services import RouterServices
from deployments.scheduler.admission import count_forwarded, shed_on_published_load
from deployments.scheduler.turned_away import TurnedAwayDemand
from deployments.streams import detached
from mediagate.access.accounts import Account
from mediagate.access.guard import rate_limit_headers
from mediagate.access.tiers import check_edit_inputs, check_image_caps
from mediagate.moderation.prompts import Level
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import (
    InvalidRequest,
    MediagateError,
    ModelUnavailable,
    Overloaded,
    unwrap,
)
from mediagate.protocol.image_stream import StreamKind
from mediagate.protocol.images import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequest,
    ImagesResponse,
)
from mediagate.protocol.scheduling import PublishedLoad
from mediagate.protocol.timing import SERVER_TIMING_HEADER, server_timing
from mediagate.protocol.work import ImageJob, ImageResult, ImageTask, draw_seed
from mediagate.provenance.signing import Provenance

logger = logging.getLogger(__name__)

WORKER_HEADER = "x-mediagate-worker"  # the worker replica that made the images
MODEL_VERSION_HEADER = "x-mediagate-model-version"  # the version of the model that made them


class ImageRouter(RouterServices, Protocol):
    """What image requests need from the router."""

    on_refusal: Callable[[str, str], None]

    def served_models(self) -> list[ModelSpec]: ...

    async def remember_images(
        self, job: ImageJob, model: str, kind: str, stored: list[str]
    ) -> None: ...


@dataclass(frozen=True)
class ImageWork:
    """An image request resolved and checked against its model and tier, nothing
    reserved yet: its job, how its images go out, and (edits) the decode of its uploads,
    run once its quota is reserved (it may still refuse the request, uncharged)."""

    spec: ModelSpec
    job: ImageJob
    delivery: Delivery
    kind: StreamKind  # what its streamed events are called
    provenance: Provenance  # what its images' C2PA manifests state
    inputs: Callable[[], Awaitable[ImageJob]] | None = None
    moderation: Level = "auto"  # its level: uploads and outputs are checked at it


class ImageRequests:
    """Generations (and edits) of one router replica, with its copy of every image
    scheduler's published load."""

    def __init__(self, gateway: ImageRouter) -> None:
        self.gateway = gateway
        # Per image model: the load its scheduler last published, and when it arrived.
        self._published_load: dict[str, tuple[PublishedLoad, float]] = {}
        self._load_reads: dict[str, asyncio.Task[None]] = {}  # refreshes under way
        self.shed_by_router: Counter[str] = Counter()  # per tier, this replica only
        # What it refused early, per model: sent with its next load read, for autoscaling.
        self._turned_away: defaultdict[str, TurnedAwayDemand] = defaultdict(TurnedAwayDemand)

    async def generate(
        self,
        account: Account,
        body: ImageGenerationRequest,
        *,
        request_id: str,
        base_url: str,
        decided: Callable[[], None] = lambda: None,
        received: float | None = None,
    ) -> tuple[ImagesResponse, dict[str, str]]:
        """``POST /v1/images/generations``: check, refuse early or reserve, generate,
        then commit (or release on any failure). ``decided`` is called once the request
        is refused or goes on; ``received`` (``time.perf_counter()`` when the body was
        read) starts the ``Server-Timing`` of the answer."""
        received = time.perf_counter() if received is None else received
        try:
            work = self.generation(account, body, request_id=request_id, base_url=base_url)
        finally:
            decided()
        return await self.run(account, work, received=received)

    def generation(
        self, account: Account, body: ImageGenerationRequest, *, request_id: str, base_url: str
    ) -> ImageWork:
        """A generation resolved and checked against its model and tier (nothing reserved)."""
        self.gateway.check_prompt(body.prompt)
        level = self.gateway.moderation_level(account.tier, body.moderation)
        self.gateway.moderator.check_prompt(body.prompt, level)
        spec = self.gateway.task_model(body.model, "text-to-image")
        if "text-to-image" not in spec.tasks:
            raise InvalidRequest(
                f"model {spec.id} edits images only: send it to /v1/images/edits with the image",
                param="model",
                code="unsupported_task",
            )
        job = self.job_for(account, spec, body, request_id, **body.to_pipeline_kwargs(spec))
        provenance = Provenance(model=spec.id, prompt=body.prompt)
        delivery = Delivery.of(body, base_url)
        return ImageWork(spec, job, delivery, "image_generation", provenance, moderation=level)

    def edit(
        self,
        account: Account,
        body: ImageEditRequest,
        uploads: EditUploads,
        *,
        request_id: str,
        base_url: str,
    ) -> ImageWork:
        """``POST /v1/images/edits``: image-to-image, or inpaint with a mask. The files
        are judged by their headers and the tier decided here; they are decoded only once
        the quota is reserved (``ImageWork.inputs``: a damaged one is a 400, not charged)."""
        self.gateway.check_prompt(body.prompt)
        level = self.gateway.moderation_level(account.tier)
        self.gateway.moderator.check_prompt(body.prompt, level)
        spec = self.gateway.task_model(body.model, "text-to-image")
        task: ImageTask = "inpaint" if uploads.mask is not None else "image-to-image"
        if task not in spec.tasks:
            raise InvalidRequest(
                f"model {spec.id} does not serve {task}; GET /v1/models lists its tasks",
                param="mask" if task == "inpaint" else "model",
                code="unsupported_task",
            )
        tier = self.gateway.policy.tier(account.tier)
        check_edit_inputs(account.tier, tier, images=len(uploads.images))
        settings = self.gateway.settings
        limits = edit_upload_limits(spec, settings.max_upload_bytes, settings.max_reference_pixels)
        header = check_edit_uploads(spec, uploads, limits)
        check_edit_inputs(
            account.tier,
            tier,
            images=len(uploads.images),
            largest_pixels=header.width * header.height,
        )
        fields = body.to_pipeline_kwargs(spec, auto_size=spec.caps.fit(header.width, header.height))
        strength = edit_strength(spec, body, task, fields["num_inference_steps"])
        job = self.job_for(account, spec, body, request_id, task=task, strength=strength, **fields)

        async def with_inputs() -> ImageJob:
            width, height = job.width, job.height
            image, mask = await asyncio.to_thread(
                decode_edit_inputs, uploads, width, height, limits
            )
            # decoded only now (checked unread before): refused uploads cost nothing
            await self.gateway.image_processing.check([image], level, param="image")
            return job.model_copy(update={"init_image": image, "mask_image": mask})

        provenance = Provenance(
            model=spec.id, action="c2pa.edited", prompt=body.prompt, parent=uploads.images[0]
        )
        return ImageWork(
            spec,
            job,
            Delivery.of(body, base_url),
            "image_edit",
            provenance,
            with_inputs,
            moderation=level,
        )

    def job_for(
        self,
        account: Account,
        spec: ModelSpec,
        body: ImageRequest,
        request_id: str,
        **pipeline: Any,
    ) -> ImageJob:
        """The job of ``body`` (``pipeline``: its resolved pipeline arguments), with its
        tier's terms; refused here when the tier's caps or the scheduler's published load
        say no (nothing reserved yet)."""
        tier = self.gateway.policy.tier(account.tier)
        job = ImageJob(
            request_id=request_id,
            seed=draw_seed(body.seed),
            output_format=body.output_format,
            output_compression=body.output_compression,
            account_id=account.id,
            priority_class=tier.priority_class,
            max_wait_s=tier.max_queue_wait_s,
            max_queued=tier.max_queued,
            partial_images=(body.partial_images or 0) if body.stream else 0,
            **pipeline,
        )
        check_image_caps(
            account.tier,
            tier,
            n=job.images,
            width=job.width,
            height=job.height,
            steps=job.num_inference_steps,
            partial_images=job.partial_images,
        )
        self.refuse_if_overloaded(spec.id, job, account.tier)
        return job

    async def run(
        self, account: Account, work: ImageWork, *, received: float
    ) -> tuple[ImagesResponse, dict[str, str]]:
        """Reserve the job's images, run it, deliver the images and settle the quota.
        ``received`` (``time.perf_counter()`` when the body was read) starts the
        ``Server-Timing`` of the answer."""
        spec, job, delivery = work.spec, work.job, work.delivery
        admission = await self.gateway.guard.admit(account, kind="image", units=job.images)
        delivered = spent = False
        try:
            if work.inputs is not None:
                job = await work.inputs()
            forwarded = time.perf_counter()
            holder: list[Any] = []  # the scheduler sent to last (a moved version refuses)

            def submit(live: Any) -> Any:
                holder[:] = [live]
                return live.submit.remote(job)

            try:
                result: ImageResult = await on_live_scheduler(
                    lambda: self.gateway.schedulers, spec.id, submit
                )
            except asyncio.CancelledError:  # the caller went away: did its work start?
                # (asked of the scheduler holding it: a swap may have routed the id on)
                asking = detached(
                    started_before_leaving(
                        holder[-1] if holder else None, account.id, job.request_id
                    )
                )
                spent = await asyncio.shield(asking)
                raise
            except Exception as error:
                raise self.scheduler_error(spec.id, error) from None
            answered = time.perf_counter()
            self.refresh_load_now(spec.id)  # a slot just freed: the copy overstates
            try:
                delivered_images = await deliver(
                    result,
                    delivery,
                    work.provenance,
                    processing=self.gateway.image_processing,
                    level=work.moderation,
                    artifacts=self.gateway.artifacts,
                    url_ttl_s=self.gateway.settings.url_ttl_s,
                )
            except asyncio.CancelledError:  # left while its images were encoded: work done
                spent = True
                raise
            delivered = True  # (a failure to encode or store them is ours: not charged)
        finally:  # failures, shedding and callers who left before their work began
            await self.gateway.guard.settle(admission, charge=delivered or spent)
        if delivered_images.stored:
            await self.gateway.remember_images(job, spec.id, work.kind, delivered_images.stored)
        response = ImagesResponse(
            created=int(self.gateway.clock()),
            data=delivered_images.data,
            output_format=delivery.output_format,
            size=f"{job.width}x{job.height}",
            quality=spec.quality_of(job.num_inference_steps),
        )
        headers = rate_limit_headers(admission.usage)
        if result.worker:
            headers[WORKER_HEADER] = result.worker
        if result.model_version:
            headers[MODEL_VERSION_HEADER] = result.model_version
        scheduler_ms = sum(
            result.timings_ms.get(stage, 0.0) for stage in ("queue", "dispatch", "pipeline")
        )
        delivery_ms = delivered_images.timings_ms()
        headers[SERVER_TIMING_HEADER] = server_timing(
            {
                **result.timings_ms,
                "router": (forwarded - received) * 1000,
                "to_scheduler": max(0.0, (answered - forwarded) * 1000 - scheduler_ms),
                **delivery_ms,
                "respond": max(
                    0.0, (time.perf_counter() - answered) * 1000 - sum(delivery_ms.values())
                ),
            }
        )
        return response, headers

    def refuse_if_overloaded(self, model_id: str, job: ImageJob, tier_name: str) -> None:
        """Refuse here, before any quota write or hop, what the scheduler would refuse (its
        decision, on the load it published, updated for what this router forwarded)."""
        published = self._published_load.get(model_id)
        if published is None:
            return
        load, received_at = published
        now = self.gateway.clock()
        try:
            shed_on_published_load(
                load,
                priority_class=job.priority_class,
                batch_key=job.batch_key,
                account_id=job.account_id,
                max_wait_s=job.max_wait_s,
                max_queued=job.max_queued,
                age_s=now - received_at,
                max_age_s=self.gateway.settings.load_max_age_s,
            )
        except Overloaded:
            self.shed_by_router[tier_name] += 1
            slot_s = load.service_s.get(job.batch_key, 0.0)
            self._turned_away[model_id].add(job.account_id, job.priority_class, slot_s, now)
            raise
        count_forwarded(load, priority_class=job.priority_class, account_id=job.account_id)

    def scheduler_error(self, model_id: str, error: BaseException) -> MediagateError:
        """What a failed scheduler call means to the caller: the scheduler's own refusal
        or failure, or (it could not be reached) a 503 to retry shortly."""
        cause = unwrap(error)
        if isinstance(cause, MediagateError):
            return cause
        logger.error("scheduler of %s unreachable: %r", model_id, error)
        return ModelUnavailable(
            f"model {model_id} is restarting; please retry shortly", retry_after_s=2
        )

    async def follow_load(self) -> None:
        """Keep a fresh copy of every image scheduler's published load (runs for the
        router's lifetime); a scheduler that does not answer is simply not used."""
        while True:
            served = self.gateway.served_models()
            image_models = [spec.id for spec in served if spec.task == "text-to-image"]
            # all at once: one slow scheduler must not delay the others' fresh loads
            await asyncio.gather(*(self._read_load(model_id) for model_id in image_models))
            await asyncio.sleep(self.gateway.settings.load_refresh_s)

    def forget_load(self, model_id: str) -> None:
        """Drop ``model_id``'s published load (its scheduler was replaced or removed)."""
        self._published_load.pop(model_id, None)

    def refresh_load_now(self, model_id: str) -> None:
        """Read ``model_id``'s load now rather than at the next refresh (one read at a
        time per model): the copy counts what this router forwarded but not what was
        answered since, and right after an answer it would refuse work a free slot
        could take."""
        if model_id in self._published_load and model_id not in self._load_reads:
            read = asyncio.create_task(self._read_load(model_id))
            self._load_reads[model_id] = read
            read.add_done_callback(lambda _: self._load_reads.pop(model_id, None))

    async def _read_load(self, model_id: str) -> None:
        scheduler = self.gateway.schedulers.get(model_id)
        if scheduler is None:
            return  # taken out of service meanwhile
        turned_away = self._turned_away[model_id].take_unsent()
        try:
            load = await asyncio.wait_for(scheduler.published_load.remote(turned_away), 2)
        except Exception as error:
            self._turned_away[model_id].give_back(turned_away)
            logger.debug("no load from %s: %r", model_id, error)
        else:
            self._published_load[model_id] = (load, self.gateway.clock())
