"""Video jobs as the router sees them: durable records in the state store.

Create asks the model's scheduler whether the job may queue (the tier's longest
wait and queue length; refused at once, before anything is reserved or stored),
stores a ``queued`` job before answering and hands it to the scheduler (which also
finds it on its own if that hand-over fails); every operation is scoped to the
calling account, so other accounts get 404. Only plain data goes to the
scheduler: ids and the tier's numbers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Protocol

from deployments.router.live_schedulers import on_live_scheduler
from deployments.router.services import RouterServices
from deployments.router.video_uploads import decode_image_reference
from mediagate.access.accounts import Account
from mediagate.access.guard import rate_limit_headers
from mediagate.access.tiers import Tier, check_video_request
from mediagate.jobs.video import VideoJobLifecycle
from mediagate.moderation.prompts import Level
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import (
    Gone,
    InvalidRequest,
    ModelRemoved,
    NotFound,
    Overloaded,
    unwrap,
)
from mediagate.protocol.videos import (
    VideoCreateRequest,
    VideoDeleted,
    VideoError,
    VideoList,
    VideoObject,
    VideoRemixRequest,
)
from mediagate.protocol.work import RawImage, VideoGeneration, draw_seed
from mediagate.stores import JobStore, ListOrder, VideoJobRecord
from mediagate.stores.artifacts import content_type
from mediagate.stores.records import VideoVariant
from models.encoding import to_raw_image
from models.uploads import (
    ALLOWED_FORMATS,
    UploadLimits,
    UploadRejected,
    load_reference_image,
    read_upload_header,
    sniff_format,
)

logger = logging.getLogger(__name__)

# How long creation waits for the scheduler's admission answer before going on
# without it (the job is durable; the scheduler finds it either way).
ADMIT_TIMEOUT_S = 5.0


class VideoRouter(RouterServices, Protocol):
    """What video jobs need from the router."""

    jobs: JobStore

    def model(self, model_id: str) -> ModelSpec: ...


class VideoJobs:
    """Create, read, list, delete, download and remix an account's video jobs."""

    def __init__(self, gateway: VideoRouter) -> None:
        self.gateway = gateway

    @property
    def lifecycle(self) -> VideoJobLifecycle:
        """The job transitions, on whatever store the router uses now."""
        return VideoJobLifecycle(self.gateway.jobs, clock=self.gateway.clock)

    def _check_reference(self, spec: ModelSpec, data: bytes) -> None:
        """Refuse an uploaded image by what the model takes and by its header alone
        (type, bytes, pixels): before the tier and quota decide, nothing is decoded."""
        if "image-to-video" not in spec.tasks:
            raise InvalidRequest(
                f"model {spec.id} generates from text only; it does not take `input_reference`",
                param="input_reference",
                code="unsupported_parameter",
            )
        try:
            read_upload_header(data, **self._upload_limits.as_kwargs())
        except UploadRejected as error:
            raise InvalidRequest(str(error), param="input_reference") from None

    @property
    def _upload_limits(self) -> UploadLimits:
        settings = self.gateway.settings
        return UploadLimits(settings.max_upload_bytes, settings.max_reference_pixels)

    async def _store_reference(self, data: bytes, level: Level) -> str:
        """Decode the image (a damaged one is a 400), check it (a refused one too), and
        keep it for the worker; once the job's slot is reserved."""
        processing = self.gateway.image_processing

        def decoded() -> RawImage | None:  # (pixels only when they are to be checked)
            try:
                image = load_reference_image(data, **self._upload_limits.as_kwargs())
            except UploadRejected as error:
                raise InvalidRequest(str(error), param="input_reference") from None
            return to_raw_image(image) if processing.checks_images else None

        image = await asyncio.to_thread(decoded)
        if image is not None:
            await processing.check([image], level, param="input_reference")
        extension = ALLOWED_FORMATS[sniff_format(data) or "PNG"]
        return await asyncio.to_thread(self.gateway.artifacts.put, data, extension, "ref")

    async def create(
        self,
        account: Account,
        body: VideoCreateRequest,
        reference: bytes | None = None,
    ) -> tuple[VideoJobRecord, dict[str, str]]:
        """Store a new ``queued`` job and hand it to the model's scheduler."""
        gateway = self.gateway
        gateway.check_prompt(body.prompt)
        level = gateway.moderation_level(account.tier)
        gateway.moderator.check_prompt(body.prompt, level)
        spec = gateway.task_model(body.model, "text-to-video")
        resolved = body.resolve(spec)
        seconds = resolved.pop("seconds")
        # before the upload is decoded or stored (``_submit`` checks every job again)
        self._check_tier(
            account, seconds, resolved["width"], resolved["height"], resolved["num_inference_steps"]
        )
        if reference is None and body.input_reference is not None:
            reference = decode_image_reference(
                body.input_reference.image_url, body.input_reference.file_id
            )
        if reference is not None:
            self._check_reference(spec, reference)
        generation = VideoGeneration(
            **resolved, seed=draw_seed(body.seed), moderation=level, tier=account.tier
        )
        return await self._submit(account, spec, generation, seconds, reference=reference)

    async def _submit(
        self,
        account: Account,
        spec: ModelSpec,
        generation: VideoGeneration,
        seconds: int,
        remixed_from: str | None = None,
        reference: bytes | None = None,
    ) -> tuple[VideoJobRecord, dict[str, str]]:
        """Ask the scheduler to admit the job, reserve a video slot, decode and keep an
        uploaded ``reference`` (only now) and store the job; a refused or failed
        submission leaves nothing behind (the reference image stored for it is deleted
        again, the slot given back)."""
        tier = self.gateway.policy.tier(account.tier)
        try:
            # the one door every new job passes (created or remixed): the tier's terms now
            steps = generation.num_inference_steps
            self._check_tier(account, seconds, generation.width, generation.height, steps)
            await self._admit_to_queue(account, spec, tier)
            admission = await self.gateway.guard.admit(account, kind="video", units=1)
        except BaseException:
            await self._forget_reference(generation)
            raise
        if reference is not None:
            try:
                reference_id = await self._store_reference(reference, generation.moderation)
            except BaseException:
                await self.gateway.guard.settle(admission, charge=False)
                raise
            generation = generation.model_copy(update={"input_reference": reference_id})
        created_at = self.gateway.clock()
        job = VideoJobRecord(
            id=f"video_{uuid.uuid4().hex}",
            account_id=account.id,
            model=spec.id,
            status="queued",
            prompt=generation.prompt,
            seconds=seconds,
            size=f"{generation.width}x{generation.height}",
            created_at=created_at,
            remixed_from=remixed_from,
            generation=generation.model_dump(),
            reservation_id=admission.reservation_id,
            priority_class=tier.priority_class,
            queue_deadline_at=created_at + tier.max_queue_wait_s,
        )
        try:
            await self.lifecycle.create(job)
        except BaseException:
            await self.gateway.guard.settle(admission, charge=False)
            await self._forget_reference(generation)
            raise
        try:
            await on_live_scheduler(
                lambda: self.gateway.schedulers,
                spec.id,
                lambda live: live.enqueue.remote(account.id, job.id, job.priority_class),
            )
        except Exception as error:  # stored as queued: the scheduler's reconcile finds it
            logger.warning("could not hand %s to its scheduler now: %r", job.id, error)
        return job, rate_limit_headers(admission.usage)

    def _check_tier(
        self, account: Account, seconds: int, width: int, height: int, steps: int
    ) -> None:
        """The account's tier, as it is now, allows this video (gate, age and caps)."""
        check_video_request(
            account.tier,
            self.gateway.policy.tier(account.tier),
            account_age_s=self.gateway.clock() - account.created_at,
            seconds=seconds,
            width=width,
            height=height,
            steps=steps,
        )

    async def _admit_to_queue(self, account: Account, spec: ModelSpec, tier: Tier) -> None:
        """The scheduler's admission decision, the image path's on the video queue: 503
        ``server_overloaded`` when the tier's class queue is full or the job would not
        start well within the tier's longest wait. A scheduler that cannot answer does
        not block creation: the job is durable and its reconcile finds it."""
        try:
            await asyncio.wait_for(
                on_live_scheduler(  # (a version being swapped out: the new one admits)
                    lambda: self.gateway.schedulers,
                    spec.id,
                    lambda live: live.admit.remote(
                        account.id, tier.priority_class, tier.max_queue_wait_s, tier.max_queued
                    ),
                ),
                ADMIT_TIMEOUT_S,
            )
        except Exception as error:
            if isinstance(unwrap(error), Overloaded | ModelRemoved):
                raise unwrap(error) from None
            logger.warning("could not ask %s's scheduler to admit a job: %r", spec.id, error)

    async def _forget_reference(self, generation: VideoGeneration) -> None:
        if generation.input_reference is not None:
            try:
                await asyncio.to_thread(self.gateway.artifacts.delete, generation.input_reference)
            except Exception as error:
                logger.warning("could not delete %s: %r", generation.input_reference, error)

    async def get(self, account: Account, video_id: str) -> VideoJobRecord:
        job = await self.gateway.jobs.get_job(account.id, video_id)
        if job is None:
            raise NotFound(f"no video {video_id!r}", param="video_id", code="video_not_found")
        return job

    async def list(
        self, account: Account, *, after: str | None, limit: int, order: ListOrder
    ) -> VideoList:
        jobs, has_more = await self.gateway.jobs.list_jobs(
            account.id, after=after, limit=limit, order=order
        )
        data = [self.to_object(job) for job in jobs]
        return VideoList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )

    async def delete(self, account: Account, video_id: str) -> VideoDeleted:
        """Forget the job; a queued one leaves the queue, a running one stops at its next step."""
        job = await self.lifecycle.delete(account.id, video_id)  # its slot is given back
        if job is None:
            raise NotFound(f"no video {video_id!r}", param="video_id", code="video_not_found")
        if job.status == "queued" and job.model in self.gateway.schedulers:
            try:
                await self.gateway.schedulers[job.model].cancel.remote(job.account_id, job.id)
            except Exception as error:  # the claim will find it deleted anyway
                logger.warning("could not take %s off its queue: %r", job.id, error)
        await asyncio.to_thread(self._delete_files, job)
        return VideoDeleted(id=job.id)

    def _delete_files(self, job: VideoJobRecord) -> None:
        reference = job.generation.get("input_reference")
        checkpoint = job.checkpoint.artifact if job.checkpoint else None  # a job deleted mid-run
        extra = [artifact for artifact in (reference, checkpoint) if artifact]
        for artifact_id in [*job.artifacts.values(), *extra]:
            try:
                self.gateway.artifacts.delete(artifact_id)
            except Exception as error:
                logger.warning("could not delete %s of %s: %r", artifact_id, job.id, error)

    async def _completed(self, account: Account, video_id: str, why: str) -> VideoJobRecord:
        """The account's job, which must have completed (400 ``video_not_ready`` otherwise)."""
        job = await self.get(account, video_id)
        if job.status != "completed":
            raise InvalidRequest(
                f"video {video_id} is {job.status}; {why}",
                param="video_id",
                code="video_not_ready",
            )
        return job

    async def content(
        self, account: Account, video_id: str, variant: VideoVariant
    ) -> tuple[bytes, str]:
        job = await self._completed(account, video_id, "content exists once it is completed")
        if job.expires_at is not None and self.gateway.clock() >= job.expires_at:
            raise Gone(f"the content of video {video_id} has expired", param="video_id")
        artifact_id = job.artifacts.get(variant)
        if artifact_id is None:
            raise NotFound(f"video {video_id} has no {variant}", param="variant")
        data = await asyncio.to_thread(self.gateway.artifacts.read, artifact_id)
        return data, content_type(artifact_id)

    async def remix(
        self, account: Account, video_id: str, body: VideoRemixRequest
    ) -> tuple[VideoJobRecord, dict[str, str]]:
        """A new job with the source's model, size, length and seed, and a new prompt."""
        self.gateway.check_prompt(body.prompt)
        level = self.gateway.moderation_level(account.tier)
        self.gateway.moderator.check_prompt(body.prompt, level)
        source = await self._completed(account, video_id, "only completed videos can be remixed")
        spec = self.gateway.model(source.model)
        generation = VideoGeneration.model_validate(
            {**source.generation, "prompt": body.prompt, "moderation": level, "tier": account.tier}
        )
        if generation.input_reference is not None:  # the remix must outlive its source
            copied = await asyncio.to_thread(self._copy_artifact, generation.input_reference)
            generation = generation.model_copy(update={"input_reference": copied})
        return await self._submit(account, spec, generation, source.seconds, remixed_from=source.id)

    def _copy_artifact(self, artifact_id: str) -> str:
        extension = artifact_id.rsplit(".", 1)[-1]
        return self.gateway.artifacts.put(
            self.gateway.artifacts.read(artifact_id), extension, "ref"
        )

    async def queue_position(self, job: VideoJobRecord) -> int | None:
        """Where a queued job stands in its scheduler's queue (None if unknown)."""
        if job.status != "queued" or job.model not in self.gateway.schedulers:
            return None
        try:
            position = await asyncio.wait_for(
                self.gateway.schedulers[job.model].position.remote(job.id), 2
            )
        except Exception:  # the scheduler is busy or restarting: the job is still queued
            return None
        return int(position) or None

    def to_object(self, job: VideoJobRecord, *, queue_position: int | None = None) -> VideoObject:
        error = None
        if job.status == "failed":
            error = VideoError(
                code=job.error_code or "generation_failed",
                message=job.error_message or "the video could not be generated",
            )
        return VideoObject(
            id=job.id,
            status=job.status,
            progress=job.progress,
            created_at=int(job.created_at),
            completed_at=int(job.completed_at) if job.completed_at is not None else None,
            expires_at=int(job.expires_at) if job.expires_at is not None else None,
            model=job.model,
            prompt=job.prompt,
            seconds=str(job.seconds),
            size=job.size,
            remixed_from_video_id=job.remixed_from,
            error=error,
            queue_position=queue_position,
            model_version=job.model_version,
        )

    async def purge_expired(self) -> int:
        """Delete the files and records of jobs whose content has expired."""
        removed = 0
        for job in await self.gateway.jobs.expired_jobs(self.gateway.clock()):
            if await self.lifecycle.delete(job.account_id, job.id) is not None:
                await asyncio.to_thread(self._delete_files, job)
                removed += 1
        return removed
