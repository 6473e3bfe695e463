"""Router: the FastAPI ingress. Thin by design, and free of torch and diffusers.

Authenticate the key, resolve the model, validate the request against the
model's caps, hand the work to that model's scheduler, and answer: images inline
(base64) or as URLs, videos as durable jobs in the state store that the client
polls. Every error leaves through ``http_edge``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from deployments.errors import Gone, InvalidRequest, NotFound, Unauthorized
from deployments.http_edge import EdgeMiddleware, install_error_handlers, invalid_request_from
from deployments.jobs import ImageJob, ImageResult, VideoGeneration
from deployments.protocol import (
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    ModelObject,
    VideoCreateRequest,
    VideoDeleted,
    VideoError,
    VideoList,
    VideoObject,
    VideoRemixRequest,
)
from mediagate.accounts import Account, SqliteAccountStore
from mediagate.artifacts import (
    ArtifactConfig,
    ArtifactStore,
    LocalArtifactStore,
    content_type,
    open_artifact_store,
)
from mediagate.settings import HomeLayout
from mediagate.state import JobStore, ListOrder, StateConfig, VideoJobRecord, open_state_store
from mediagate.state.records import VideoVariant
from models.catalog import Catalog, ModelSpec, Task, load_catalog
from models.uploads import ALLOWED_FORMATS, UploadRejected, load_reference_image, sniff_format

logger = logging.getLogger(__name__)

MAX_SEED_DRAWN = 2**32 - 1
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 410, 413, 429, 500, 503)
}
POLL_AFTER_HEADER = "openai-poll-after-ms"
VIDEO_FORM_FIELDS = frozenset(VideoCreateRequest.model_fields) - {"input_reference"}


def decode_image_reference(image_url: str | None, file_id: str | None) -> bytes:
    """The bytes of an ``input_reference`` given as an object: only ``data:`` URLs.

    Fetching arbitrary URLs from inside the cluster would let callers probe it, so
    remote images must be uploaded (multipart) or inlined as a base64 data URL.
    """
    if file_id is not None:
        raise InvalidRequest(
            "`input_reference.file_id` is not supported; upload the image as a file",
            param="input_reference",
            code="unsupported_parameter",
        )
    if not image_url:
        raise InvalidRequest(
            "`input_reference` needs a file or an `image_url`", param="input_reference"
        )
    header, comma, payload = image_url.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64") and comma):
        raise InvalidRequest(
            "`input_reference.image_url` must be a base64 data URL (data:image/png;base64,...); "
            "upload remote images as a file instead",
            param="input_reference",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "`input_reference.image_url` is not valid base64", param="input_reference"
        ) from None


async def parse_video_form(request: Request) -> tuple[dict[str, Any], bytes | None]:
    """A multipart ``POST /v1/videos``: fields, and the uploaded ``input_reference`` bytes."""
    form = await request.form()
    fields: dict[str, Any] = {}
    reference: dict[str, str] = {}
    upload: bytes | None = None
    for name, value in form.multi_items():
        if name == "input_reference" and not isinstance(value, str):
            upload = await value.read()
        elif name.startswith("input_reference[") and name.endswith("]"):
            reference[name[len("input_reference[") : -1]] = str(value)
        elif isinstance(value, str):
            fields[name] = value
        else:
            raise InvalidRequest(f"unexpected file in field `{name}`", param=name)
    if reference:
        fields["input_reference"] = reference
    return fields, upload


class RouterSettings(BaseModel):
    """Limits at the edge; part of the typed application arguments."""

    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger bodies get 413.")
    max_prompt_chars: int = Field(4000, ge=1, description="Longer prompts get 400.")
    url_ttl_s: int = Field(3600, ge=10, description="Lifetime of image URLs.")
    artifact_sweep_s: float = Field(300, gt=0, description="How often expired files are removed.")
    max_upload_bytes: int = Field(
        20 * 1_048_576, ge=1024, description="Body limit of POST /v1/videos (image uploads)."
    )
    max_reference_pixels: int = Field(
        4096 * 4096, ge=64, description="Uploaded images with more pixels are refused unread."
    )
    poll_after_ms: int = Field(
        1000, ge=50, description="`openai-poll-after-ms` on video GETs: how often clients poll."
    )


class Gateway:
    """The router's behaviour, independent of Ray: tests drive it with fake handles."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        schedulers: Mapping[str, Any],
        accounts: Any,
        artifacts: ArtifactStore,
        jobs: JobStore,
        settings: RouterSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.schedulers = dict(schedulers)
        self.accounts = accounts
        self.artifacts = artifacts
        self.jobs = jobs
        self.settings = settings
        self._clock = clock
        self.started_at = int(clock())

    async def authenticate(self, authorization: str | None) -> Account:
        if not authorization:
            raise Unauthorized(
                "no API key: send `Authorization: Bearer YOUR_KEY`", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be `Bearer YOUR_KEY`")
        account = await self.accounts.authenticate(key.strip())
        if account is None:
            raise Unauthorized("incorrect or revoked API key")
        return account

    def served_models(self) -> list[ModelSpec]:
        return [
            spec for model_id, spec in self.catalog.models.items() if model_id in self.schedulers
        ]

    def model(self, model_id: str) -> ModelSpec:
        spec = self.catalog.get(model_id)
        if spec is None or model_id not in self.schedulers:
            raise NotFound(
                f"the model {model_id!r} does not exist; GET /v1/models lists the models served",
                param="model",
                code="model_not_found",
            )
        return spec

    def task_model(self, model_id: str | None, task: Task) -> ModelSpec:
        """The model to use for ``task``: the one named, or the task's default."""
        if model_id is None:
            default = self.catalog.default_for(task)
            if default is None or default.id not in self.schedulers:
                kind = task.removeprefix("text-to-")
                raise InvalidRequest(
                    f"no default {kind} model is served; set `model`", param="model"
                )
            return default
        spec = self.model(model_id)
        if spec.task != task:
            raise InvalidRequest(
                f"model {model_id} is a {spec.task} model; use it through its own endpoint",
                param="model",
            )
        return spec

    async def generate_images(
        self, body: ImageGenerationRequest, *, request_id: str, base_url: str
    ) -> ImagesResponse:
        if len(body.prompt) > self.settings.max_prompt_chars:
            raise InvalidRequest(
                f"`prompt` must be at most {self.settings.max_prompt_chars} characters, "
                f"got {len(body.prompt)}",
                param="prompt",
                code="string_above_max_length",
            )
        spec = self.task_model(body.model, "text-to-image")
        job = ImageJob(
            request_id=request_id,
            seed=body.seed if body.seed is not None else secrets.randbelow(MAX_SEED_DRAWN),
            output_format=body.output_format,
            output_compression=body.output_compression,
            **body.to_pipeline_kwargs(spec),
        )
        result: ImageResult = await self.schedulers[spec.id].submit.remote(job)
        if body.response_format == "url":
            data = await asyncio.to_thread(self._store_images, result.images, body, base_url)
        else:
            data = [ImageData(b64_json=base64.b64encode(image).decode()) for image in result.images]
        return ImagesResponse(
            created=int(self._clock()),
            data=data,
            output_format=body.output_format,
            size=f"{job.width}x{job.height}",
            quality=body.quality,
        )

    def _store_images(
        self, images: list[bytes], body: ImageGenerationRequest, base_url: str
    ) -> list[ImageData]:
        data = []
        for image in images:
            artifact_id = self.artifacts.put(image, body.output_format, "img")
            data.append(
                ImageData(url=self.artifacts.url(artifact_id, self.settings.url_ttl_s, base_url))
            )
        return data

    # Videos: durable jobs in the state store.

    def _check_prompt(self, prompt: str) -> None:
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidRequest(
                f"`prompt` must be at most {self.settings.max_prompt_chars} characters, "
                f"got {len(prompt)}",
                param="prompt",
                code="string_above_max_length",
            )

    def _store_reference(self, spec: ModelSpec, data: bytes) -> str:
        """Validate an uploaded image (limits before decoding) and keep it for the worker."""
        if spec.video is None or spec.video.image_to_video_pipeline_class is None:
            raise InvalidRequest(
                f"model {spec.id} generates from text only; it does not take `input_reference`",
                param="input_reference",
                code="unsupported_parameter",
            )
        try:
            load_reference_image(
                data,
                max_bytes=self.settings.max_upload_bytes,
                max_pixels=self.settings.max_reference_pixels,
            )
        except UploadRejected as error:
            raise InvalidRequest(str(error), param="input_reference") from None
        extension = ALLOWED_FORMATS[sniff_format(data) or "PNG"]
        return self.artifacts.put(data, extension, "ref")

    async def create_video(
        self,
        account: Account,
        body: VideoCreateRequest,
        reference: bytes | None = None,
    ) -> VideoJobRecord:
        """Store a new ``queued`` job and hand it to the model's scheduler."""
        self._check_prompt(body.prompt)
        spec = self.task_model(body.model, "text-to-video")
        resolved = body.resolve(spec)
        seconds = resolved.pop("seconds")
        if reference is None and body.input_reference is not None:
            reference = decode_image_reference(
                body.input_reference.image_url, body.input_reference.file_id
            )
        reference_id = None
        if reference is not None:
            reference_id = await asyncio.to_thread(self._store_reference, spec, reference)
        generation = VideoGeneration(
            **resolved,
            seed=body.seed if body.seed is not None else secrets.randbelow(MAX_SEED_DRAWN),
            input_reference=reference_id,
        )
        return await self._submit_video(account, spec, generation, seconds)

    async def _submit_video(
        self,
        account: Account,
        spec: ModelSpec,
        generation: VideoGeneration,
        seconds: int,
        remixed_from: str | None = None,
    ) -> VideoJobRecord:
        job = VideoJobRecord(
            id=f"video_{uuid.uuid4().hex}",
            account_id=account.id,
            model=spec.id,
            status="queued",
            prompt=generation.prompt,
            seconds=seconds,
            size=f"{generation.width}x{generation.height}",
            created_at=self._clock(),
            remixed_from=remixed_from,
            generation=generation.model_dump(),
        )
        await self.jobs.create_job(job)
        try:
            await self.schedulers[spec.id].enqueue.remote(account.id, job.id)
        except Exception as error:  # stored as queued: the scheduler's reconcile finds it
            logger.warning("could not hand %s to its scheduler now: %r", job.id, error)
        return job

    async def video(self, account: Account, video_id: str) -> VideoJobRecord:
        job = await self.jobs.get_job(account.id, video_id)
        if job is None:
            raise NotFound(f"no video {video_id!r}", param="video_id", code="video_not_found")
        return job

    async def list_videos(
        self, account: Account, *, after: str | None, limit: int, order: ListOrder
    ) -> VideoList:
        jobs, has_more = await self.jobs.list_jobs(
            account.id, after=after, limit=limit, order=order
        )
        data = [self.video_object(job) for job in jobs]
        return VideoList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )

    async def delete_video(self, account: Account, video_id: str) -> VideoDeleted:
        """Forget the job; a queued one leaves the queue, a running one stops at its next step."""
        job = await self.jobs.delete_job(account.id, video_id)
        if job is None:
            raise NotFound(f"no video {video_id!r}", param="video_id", code="video_not_found")
        if job.status == "queued" and job.model in self.schedulers:
            try:
                await self.schedulers[job.model].cancel.remote(job.account_id, job.id)
            except Exception as error:  # the claim will find it deleted anyway
                logger.warning("could not take %s off its queue: %r", job.id, error)
        await asyncio.to_thread(self._delete_files, job)
        return VideoDeleted(id=job.id)

    def _delete_files(self, job: VideoJobRecord) -> None:
        reference = job.generation.get("input_reference")
        for artifact_id in [*job.artifacts.values(), *([reference] if reference else [])]:
            try:
                self.artifacts.delete(artifact_id)
            except Exception as error:
                logger.warning("could not delete %s of %s: %r", artifact_id, job.id, error)

    async def video_content(
        self, account: Account, video_id: str, variant: VideoVariant
    ) -> tuple[bytes, str]:
        job = await self.video(account, video_id)
        if job.status != "completed":
            raise InvalidRequest(
                f"video {video_id} is {job.status}; content exists once it is completed",
                param="video_id",
                code="video_not_ready",
            )
        if job.expires_at is not None and self._clock() >= job.expires_at:
            raise Gone(f"the content of video {video_id} has expired", param="video_id")
        artifact_id = job.artifacts.get(variant)
        if artifact_id is None:
            raise NotFound(f"video {video_id} has no {variant}", param="variant")
        data = await asyncio.to_thread(self.artifacts.read, artifact_id)
        return data, content_type(artifact_id)

    async def remix_video(
        self, account: Account, video_id: str, body: VideoRemixRequest
    ) -> VideoJobRecord:
        """A new job with the source's model, size, length and seed, and a new prompt."""
        self._check_prompt(body.prompt)
        source = await self.video(account, video_id)
        if source.status != "completed":
            raise InvalidRequest(
                f"video {video_id} is {source.status}; only completed videos can be remixed",
                param="video_id",
                code="video_not_ready",
            )
        spec = self.model(source.model)
        generation = VideoGeneration.model_validate({**source.generation, "prompt": body.prompt})
        if generation.input_reference is not None:  # the remix must outlive its source
            copied = await asyncio.to_thread(self._copy_artifact, generation.input_reference)
            generation = generation.model_copy(update={"input_reference": copied})
        return await self._submit_video(
            account, spec, generation, source.seconds, remixed_from=source.id
        )

    def _copy_artifact(self, artifact_id: str) -> str:
        extension = artifact_id.rsplit(".", 1)[-1]
        return self.artifacts.put(self.artifacts.read(artifact_id), extension, "ref")

    def video_object(self, job: VideoJobRecord) -> VideoObject:
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
        )

    async def purge_expired_videos(self) -> int:
        """Delete the files and records of jobs whose content has expired."""
        removed = 0
        for job in await self.jobs.expired_jobs(self._clock()):
            if await self.jobs.delete_job(job.account_id, job.id) is not None:
                await asyncio.to_thread(self._delete_files, job)
                removed += 1
        return removed

    def model_object(self, spec: ModelSpec) -> ModelObject:
        return ModelObject(
            id=spec.id, created=self.started_at, owned_by=spec.owned_by, task=spec.task
        )


def create_api(
    gateway: Gateway, *, background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()
) -> FastAPI:
    """The HTTP surface: OpenAI Images and Models, signed file downloads, health.

    ``background`` coroutines run for the app's lifetime (started and cancelled by
    its lifespan).
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks: list[asyncio.Task[None]] = [asyncio.create_task(job()) for job in background]
        yield
        for task in tasks:
            task.cancel()

    app = FastAPI(title="mediagate", version="0.1.0", responses=ERROR_RESPONSES, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=gateway.settings.max_body_bytes,
        upload_paths={"/v1/videos"},
        max_upload_bytes=gateway.settings.max_upload_bytes,
    )
    poll_headers = {POLL_AFTER_HEADER: str(gateway.settings.poll_after_ms)}

    async def account_of(request: Request) -> Account:
        return await gateway.authenticate(request.headers.get("authorization"))

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": ImageGenerationRequest.model_json_schema()}
                },
            }
        },
    )
    async def generate_images(request: Request) -> ImagesResponse:
        await gateway.authenticate(request.headers.get("authorization"))
        body = ImageGenerationRequest.model_validate_json(await request.body())
        return await gateway.generate_images(
            body, request_id=request.state.request_id, base_url=str(request.base_url)
        )

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        await gateway.authenticate(request.headers.get("authorization"))
        return ModelList(data=[gateway.model_object(spec) for spec in gateway.served_models()])

    @app.get("/v1/models/{model_id}", response_model=ModelObject)
    async def get_model(model_id: str, request: Request) -> ModelObject:
        await gateway.authenticate(request.headers.get("authorization"))
        return gateway.model_object(gateway.model(model_id))

    @app.get("/v1/files/{artifact_id}/content")
    async def download(
        artifact_id: str, expires: int = Query(...), signature: str = Query(...)
    ) -> Response:
        if not isinstance(gateway.artifacts, LocalArtifactStore):  # S3 URLs go to S3
            raise NotFound(f"no file {artifact_id!r}", param="file_id")
        data = await asyncio.to_thread(
            gateway.artifacts.read_signed, artifact_id, expires, signature
        )
        return Response(
            data, media_type=content_type(artifact_id), headers={"cache-control": "private"}
        )

    @app.post(
        "/v1/videos",
        response_model=VideoObject,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": VideoCreateRequest.model_json_schema()},
                    "multipart/form-data": {"schema": VideoCreateRequest.model_json_schema()},
                },
            }
        },
    )
    async def create_video(request: Request) -> JSONResponse:
        account = await account_of(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        upload = None
        if media_type == "multipart/form-data":
            fields, upload = await parse_video_form(request)
            try:
                body = VideoCreateRequest.model_validate(fields)
            except ValidationError as error:
                raise invalid_request_from(error.errors()) from None
            if upload is not None and body.input_reference is not None:
                raise InvalidRequest(
                    "send `input_reference` as a file or as an object, not both",
                    param="input_reference",
                )
        else:
            body = VideoCreateRequest.model_validate_json(await request.body())
        job = await gateway.create_video(account, body, upload)
        return JSONResponse(gateway.video_object(job).model_dump(mode="json"), headers=poll_headers)

    @app.get("/v1/videos", response_model=VideoList)
    async def list_videos(
        request: Request,
        after: Annotated[str | None, Query(description="Last id of the previous page.")] = None,
        limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
        order: Annotated[ListOrder, Query(description="By creation time.")] = "desc",
    ) -> VideoList:
        return await gateway.list_videos(
            await account_of(request), after=after, limit=limit, order=order
        )

    @app.get("/v1/videos/{video_id}", response_model=VideoObject)
    async def get_video(video_id: str, request: Request) -> JSONResponse:
        job = await gateway.video(await account_of(request), video_id)
        return JSONResponse(gateway.video_object(job).model_dump(mode="json"), headers=poll_headers)

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted)
    async def delete_video(video_id: str, request: Request) -> VideoDeleted:
        return await gateway.delete_video(await account_of(request), video_id)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(
        video_id: str,
        request: Request,
        variant: Annotated[
            VideoVariant, Query(description="video, thumbnail or spritesheet.")
        ] = "video",
    ) -> Response:
        data, media_type = await gateway.video_content(await account_of(request), video_id, variant)
        return Response(data, media_type=media_type, headers={"cache-control": "private"})

    @app.post("/v1/videos/{video_id}/remix", response_model=VideoObject)
    async def remix_video(video_id: str, request: Request) -> JSONResponse:
        account = await account_of(request)
        body = VideoRemixRequest.model_validate_json(await request.body())
        job = await gateway.remix_video(account, video_id, body)
        return JSONResponse(gateway.video_object(job).model_dump(mode="json"), headers=poll_headers)

    @app.get("/healthz")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "models": sorted(gateway.schedulers)})

    return app


class Router:
    """Serve ingress deployment; the builder wraps it with ``serve.ingress()``."""

    def __init__(
        self,
        schedulers: dict[str, Any],
        *,
        home: str,
        state: dict[str, Any],
        artifacts: dict[str, Any],
        catalog: str | None = None,
        settings: dict[str, Any] | None = None,
        accounts: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        layout = HomeLayout(home)
        self.gateway = Gateway(
            catalog=load_catalog(catalog),
            schedulers=schedulers,
            accounts=accounts or SqliteAccountStore(layout.state_db, clock=clock),
            artifacts=open_artifact_store(ArtifactConfig.model_validate(artifacts), clock=clock),
            jobs=open_state_store(StateConfig.model_validate(state)),
            settings=RouterSettings.model_validate(settings or {}),
            clock=clock,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.gateway, background=[self._sweep])

    async def _sweep(self) -> None:
        """Delete image files whose URLs have expired (with a minute's grace) and the
        files and records of videos whose content has expired."""
        gateway = self.gateway
        settings = gateway.settings
        while True:
            try:
                images = await asyncio.to_thread(
                    gateway.artifacts.delete_older_than, settings.url_ttl_s + 60, "img"
                )
                videos = await gateway.purge_expired_videos()
            except Exception as error:  # a store outage must not end the sweep
                logger.warning("artifact sweep failed: %r", error)
            else:
                if images or videos:
                    logger.info("removed %d expired images and %d expired videos", images, videos)
            await asyncio.sleep(settings.artifact_sweep_s)
