"""Router: the FastAPI ingress. Thin by design, and free of torch and diffusers.

Authenticate the key, resolve the model, validate the request against the
model's caps, hand the work to that model's scheduler, and answer: images inline
(base64) or as URLs, videos as durable jobs in the state store that the client
polls. Every error leaves through ``http_edge``.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from deployments.errors import (
    InvalidRequest,
    MediagateError,
    ModelUnavailable,
    NotFound,
    Overloaded,
    Unauthorized,
    unwrap,
)
from deployments.http_edge import EdgeMiddleware, install_error_handlers, invalid_request_from
from deployments.jobs import ImageJob, ImageResult, draw_seed
from deployments.protocol import (
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    ModelObject,
    VideoCreateRequest,
    VideoDeleted,
    VideoList,
    VideoObject,
    VideoRemixRequest,
)
from deployments.shedding import (
    DECISIONS,
    QueueStats,
    count_forwarded,
    shed_on_published_load,
)
from deployments.video_jobs import VideoJobs, parse_video_form
from mediagate.accounts import Account, AccountStore, hash_key, open_account_store
from mediagate.admission import TierGuard, rate_limit_headers
from mediagate.artifacts import (
    ArtifactConfig,
    ArtifactStore,
    LocalArtifactStore,
    content_type,
    open_artifact_store,
)
from mediagate.idempotency import IdempotencyKeys, StoredAnswer, check_key, fingerprint
from mediagate.ledger import QuotaLedger
from mediagate.settings import HomeLayout
from mediagate.state import (
    JobStore,
    ListOrder,
    StateConfig,
    StoreUnavailable,
    VideoJobRecord,
    open_state_store,
)
from mediagate.state.records import VideoVariant
from mediagate.tiers import (
    TierPolicy,
    check_image_caps,
    load_tier_policy,
    parse_tier_policy,
)
from models.catalog import Catalog, ModelSpec, Task, load_catalog

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 410, 413, 429, 500, 503)
}
POLL_AFTER_HEADER = "openai-poll-after-ms"
AUTH_STALE_IF_ERROR_S = 600.0


WORKER_HEADER = "x-mediagate-worker"  # the worker replica that made the images


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
    load_refresh_s: float = Field(
        0.2, gt=0, description="How often the router reads each image scheduler's wait estimates."
    )
    load_max_age_s: float = Field(
        2.0, gt=0, description="Older wait estimates are not used to refuse requests early."
    )


class Gateway:
    """The router's behaviour, independent of Ray: tests drive it with fake handles."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        schedulers: Mapping[str, Any],
        accounts: AccountStore,
        artifacts: ArtifactStore,
        jobs: JobStore,
        settings: RouterSettings,
        guard: TierGuard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.schedulers = dict(schedulers)
        self.accounts = accounts
        self.artifacts = artifacts
        self.jobs = jobs
        self.guard = guard or TierGuard(QuotaLedger(jobs, load_tier_policy(), clock=clock))
        self.videos = VideoJobs(self)
        self.idempotency = IdempotencyKeys(jobs, clock=clock)
        self.settings = settings
        self.clock = clock
        self.started_at = int(clock())
        # Accounts last seen per key hash, used only while the store is unreachable.
        self._seen: dict[str, tuple[Account, float]] = {}
        # Per image model: the load its scheduler last published, and when it arrived.
        self._published_load: dict[str, tuple[dict[str, Any], float]] = {}
        self.shed_by_router: Counter[str] = Counter()  # per tier, this replica only
        # Per (model, account): image requests this router has handed to the scheduler
        # and not had back (queued or running), for its early refusals.
        self._pending: Counter[tuple[str, str]] = Counter()

    async def authenticate(self, authorization: str | None) -> Account:
        if not authorization:
            raise Unauthorized(
                "no API key: send `Authorization: Bearer YOUR_KEY`", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be `Bearer YOUR_KEY`")
        key_hash = hash_key(key.strip())
        try:
            account = await self.accounts.authenticate(key.strip())
        except StoreUnavailable:
            seen = self._seen.get(key_hash)
            if seen is None or self.clock() - seen[1] > AUTH_STALE_IF_ERROR_S:
                raise
            return seen[0]  # the store is down: trust a recent answer for a while
        if account is None:
            self._seen.pop(key_hash, None)
            raise Unauthorized("incorrect or revoked API key")
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen[key_hash] = (account, self.clock())
        return account

    @property
    def policy(self) -> TierPolicy:
        return self.guard.ledger.policy

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
        self,
        account: Account,
        body: ImageGenerationRequest,
        *,
        request_id: str,
        base_url: str,
        decided: Callable[[], None] = lambda: None,
    ) -> tuple[ImagesResponse, dict[str, str]]:
        """Check, refuse early or reserve, generate, then commit (or release on any
        failure). ``decided`` is called once the request is refused or goes on."""
        try:
            self.check_prompt(body.prompt)
            spec = self.task_model(body.model, "text-to-image")
            tier = self.policy.tier(account.tier)
            job = ImageJob(
                request_id=request_id,
                seed=draw_seed(body.seed),
                output_format=body.output_format,
                output_compression=body.output_compression,
                account_id=account.id,
                priority_class=tier.priority_class,
                max_wait_s=tier.max_queue_wait_s,
                max_queued=tier.max_queued,
                **body.to_pipeline_kwargs(spec),
            )
            check_image_caps(
                account.tier,
                tier,
                n=job.images,
                width=job.width,
                height=job.height,
                steps=job.num_inference_steps,
            )
            self.refuse_if_overloaded(spec.id, job, account.tier)
        finally:
            decided()
        admission = await self.guard.admit(account, kind="image", units=job.images)
        delivered = False
        pending = (spec.id, account.id)
        self._pending[pending] += 1
        try:
            try:
                result: ImageResult = await self.schedulers[spec.id].submit.remote(job)
            except Exception as error:
                if isinstance(unwrap(error), MediagateError):
                    raise unwrap(error) from None
                logger.error("scheduler of %s unreachable: %r", spec.id, error)
                raise ModelUnavailable(
                    f"model {spec.id} is restarting; please retry shortly", retry_after_s=2
                ) from error
            finally:
                self._pending[pending] -= 1
                if not self._pending[pending]:
                    del self._pending[pending]
            if body.response_format == "url":
                data = await asyncio.to_thread(self._store_images, result.images, body, base_url)
            else:
                data = [
                    ImageData(b64_json=base64.b64encode(image).decode()) for image in result.images
                ]
            delivered = True
        finally:  # failures, shedding and callers who left all give the quota back
            await self.guard.settle(admission, delivered=delivered)
        response = ImagesResponse(
            created=int(self.clock()),
            data=data,
            output_format=body.output_format,
            size=f"{job.width}x{job.height}",
            quality=body.quality,
        )
        headers = rate_limit_headers(admission.usage)
        if result.worker:
            headers[WORKER_HEADER] = result.worker
        return response, headers

    def refuse_if_overloaded(self, model_id: str, job: ImageJob, tier_name: str) -> None:
        """Refuse here, before any quota write or hop, what the scheduler would refuse:
        its decision, from the load it last published and this account's requests that
        this router has in its queue."""
        published = self._published_load.get(model_id)
        if published is None:
            return
        load, received_at = published
        try:
            shed_on_published_load(
                load,
                priority_class=job.priority_class,
                batch_key=job.batch_key,
                own_pending=self._pending[(model_id, job.account_id)],
                max_wait_s=job.max_wait_s,
                max_queued=job.max_queued,
                age_s=self.clock() - received_at,
                max_age_s=self.settings.load_max_age_s,
            )
        except Overloaded:
            self.shed_by_router[tier_name] += 1
            raise
        count_forwarded(
            load,
            priority_class=job.priority_class,
            own_pending=self._pending[(model_id, job.account_id)],
        )

    async def follow_load(self) -> None:
        """Keep a fresh copy of every image scheduler's published load (runs for the
        router's lifetime); a scheduler that does not answer is simply not used."""
        while True:
            for spec in self.served_models():
                if spec.task != "text-to-image":
                    continue
                try:
                    load = await asyncio.wait_for(
                        self.schedulers[spec.id].published_load.remote(), 2
                    )
                except Exception as error:
                    logger.debug("no load from %s: %r", spec.id, error)
                else:
                    self._published_load[spec.id] = (load, self.clock())
            await asyncio.sleep(self.settings.load_refresh_s)

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

    async def status(self, account: Account) -> dict[str, Any]:
        """Every model's queue, image or video alike (``QueueStats``), per tier name
        rather than priority class; nothing else of a scheduler's stats (job ids) shows."""
        names: dict[int, list[str]] = {}
        for name, tier in self.policy.tiers.items():
            names.setdefault(tier.priority_class, []).append(name)

        def by_tier(values: Mapping[Any, Any]) -> dict[str, Any]:
            return {"/".join(names.get(int(cls), [f"class-{cls}"])): v for cls, v in values.items()}

        models: dict[str, Any] = {}
        for spec in self.served_models():
            try:
                stats = await asyncio.wait_for(self.schedulers[spec.id].stats.remote(), 5)
            except Exception as error:  # one scheduler down must not hide the others
                models[spec.id] = {"task": spec.task, "error": f"scheduler unavailable: {error!r}"}
                continue
            queue = QueueStats.from_dict(stats)
            models[spec.id] = {
                "task": spec.task,
                "queue_len": queue.queue_len,
                "queue_by_tier": by_tier(queue.queue_by_class),
                "running_by_tier": by_tier(queue.running_by_class),
                "busy_slots": queue.busy_slots,
                "capacity": queue.capacity,
                "replicas": queue.replicas,
                "wait_estimate_s_by_tier": by_tier(queue.wait_estimate_s_by_class),
                "wait_beyond_estimate_s_by_tier": by_tier(queue.wait_beyond_estimate_s_by_class),
                **{decision: by_tier(queue.by_class(decision)) for decision in DECISIONS},
            }
        return {
            "object": "status",
            "tier": account.tier,
            "models": models,
            "shed_by_this_router": dict(self.shed_by_router),
        }

    def check_prompt(self, prompt: str) -> None:
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidRequest(
                f"`prompt` must be at most {self.settings.max_prompt_chars} characters, "
                f"got {len(prompt)}",
                param="prompt",
                code="string_above_max_length",
            )

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

    async def idempotent(
        request: Request,
        account: Account,
        payload: Any,
        produce: Callable[[], Awaitable[tuple[JSONResponse, str | None]]],
    ) -> JSONResponse:
        """Run ``produce`` once per Idempotency-Key; repeats get the first answer again.

        ``produce`` returns the response and, for video jobs, the job id (a repeat then
        shows the job as it is now rather than as it was).
        """
        key = request.headers.get("idempotency-key")
        if key is None:
            return (await produce())[0]
        check_key(key)
        digest = fingerprint(request.method, request.url.path, payload)
        claim = await gateway.idempotency.claim(account.id, key, digest)
        if claim.answer is not None:
            answer = claim.answer
            replayed = {"idempotent-replayed": "true"}
            if answer.video_id is not None:
                response = video_response(await gateway.videos.get(account, answer.video_id))
                response.headers.update(replayed)
                return response
            return JSONResponse(
                json.loads(answer.body or "null"),
                status_code=answer.status_code,
                headers={**answer.headers, **replayed},
            )
        assert claim.claim_id is not None  # a claim replays an answer or holds the key
        try:
            response, video_id = await produce()
        except BaseException:
            await gateway.idempotency.release(account.id, key, claim.claim_id)
            raise
        kept = {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}
        stored = StoredAnswer(
            status_code=response.status_code,
            body=None if video_id else bytes(response.body).decode(),
            headers=kept,
            video_id=video_id,
        )
        await gateway.idempotency.complete(account.id, key, claim.claim_id, digest, stored)
        return response

    def video_response(job: VideoJobRecord, *, queue_position: int | None = None) -> JSONResponse:
        """A job as the client sees it, with the header that paces its polling."""
        body = gateway.videos.to_object(job, queue_position=queue_position).model_dump(mode="json")
        return JSONResponse(body, headers=poll_headers)

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
    async def generate_images(request: Request) -> JSONResponse:
        raw = await request.body()
        received = time.perf_counter()

        def decided() -> None:  # the router's own time to refuse or forward, no transport
            request.state.decision_ms = (time.perf_counter() - received) * 1000

        account = await account_of(request)
        body = ImageGenerationRequest.model_validate_json(raw)

        async def produce() -> tuple[JSONResponse, str | None]:
            response, headers = await gateway.generate_images(
                account,
                body,
                request_id=request.state.request_id,
                base_url=str(request.base_url),
                decided=decided,
            )
            content = response.model_dump(mode="json", exclude_none=True)
            return JSONResponse(content, headers=headers), None

        return await idempotent(request, account, body.model_dump(mode="json"), produce)

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
        payload = {
            "body": body.model_dump(mode="json"),
            "upload": hashlib.sha256(upload).hexdigest() if upload is not None else None,
        }

        async def produce() -> tuple[JSONResponse, str | None]:
            job, headers = await gateway.videos.create(account, body, upload)
            response = video_response(job)
            response.headers.update(headers)
            return response, job.id

        return await idempotent(request, account, payload, produce)

    @app.get("/v1/videos", response_model=VideoList)
    async def list_videos(
        request: Request,
        after: Annotated[str | None, Query(description="Last id of the previous page.")] = None,
        limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
        order: Annotated[ListOrder, Query(description="By creation time.")] = "desc",
    ) -> VideoList:
        return await gateway.videos.list(
            await account_of(request), after=after, limit=limit, order=order
        )

    @app.get("/v1/videos/{video_id}", response_model=VideoObject)
    async def get_video(video_id: str, request: Request) -> JSONResponse:
        job = await gateway.videos.get(await account_of(request), video_id)
        return video_response(job, queue_position=await gateway.videos.queue_position(job))

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted)
    async def delete_video(video_id: str, request: Request) -> VideoDeleted:
        return await gateway.videos.delete(await account_of(request), video_id)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(
        video_id: str,
        request: Request,
        variant: Annotated[
            VideoVariant, Query(description="video, thumbnail or spritesheet.")
        ] = "video",
    ) -> Response:
        data, media_type = await gateway.videos.content(
            await account_of(request), video_id, variant
        )
        return Response(data, media_type=media_type, headers={"cache-control": "private"})

    @app.post("/v1/videos/{video_id}/remix", response_model=VideoObject)
    async def remix_video(video_id: str, request: Request) -> JSONResponse:
        account = await account_of(request)
        body = VideoRemixRequest.model_validate_json(await request.body())

        async def produce() -> tuple[JSONResponse, str | None]:
            job, headers = await gateway.videos.remix(account, video_id, body)
            response = video_response(job)
            response.headers.update(headers)
            return response, job.id

        return await idempotent(request, account, body.model_dump(mode="json"), produce)

    @app.get("/v1/status")
    async def status(request: Request) -> JSONResponse:
        """Queues, capacity, wait estimates and shedding per model and tier: for humans
        and scripts (no secrets, nothing about other accounts)."""
        account = await account_of(request)
        return JSONResponse(await gateway.status(account))

    @app.get("/healthz")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "models": sorted(gateway.schedulers)})

    return app


class Router:
    """Serve ingress deployment; the builder wraps it with ``serve.ingress()``.

    Its ``user_config`` carries the tier policy (``tiers_file`` or inline
    ``tiers``): a ``serve deploy`` that changes it reloads the policy in place.
    """

    def __init__(
        self,
        schedulers: dict[str, Any],
        *,
        home: str,
        state: dict[str, Any],
        artifacts: dict[str, Any],
        catalog: str | None = None,
        settings: dict[str, Any] | None = None,
        tiers_file: str | None = None,
        accounts: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        HomeLayout(home).root.mkdir(parents=True, exist_ok=True)
        state_config = StateConfig.model_validate(state)
        jobs = open_state_store(state_config)
        self.ledger = QuotaLedger(jobs, load_tier_policy(tiers_file), clock=clock)
        self.gateway = Gateway(
            catalog=load_catalog(catalog),
            schedulers=schedulers,
            accounts=accounts or open_account_store(state_config, clock=clock),
            artifacts=open_artifact_store(ArtifactConfig.model_validate(artifacts), clock=clock),
            jobs=jobs,
            settings=RouterSettings.model_validate(settings or {}),
            guard=TierGuard(self.ledger),
            clock=clock,
        )
        # Everything loaded so far (FastAPI, pydantic, Ray) lives as long as the replica:
        # keep it out of the garbage collector's full passes, which would walk it all on
        # the event loop. (Kept for every overload measurement in BENCHMARKS.md; its own
        # effect was not measured separately.)
        gc.freeze()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Reload the tier policy from ``tiers`` (inline) or ``tiers_file``."""
        if config.get("tiers"):
            self.ledger.policy = parse_tier_policy(config["tiers"])
        elif config.get("tiers_file"):
            self.ledger.policy = load_tier_policy(config["tiers_file"])
        else:
            return
        logger.info("tier policy loaded: %s", ", ".join(self.ledger.policy.tiers))

    def status(self) -> dict[str, Any]:
        """Counters of admissions, settlements and store-outage decisions."""
        return dict(self.gateway.guard.counters)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.gateway, background=[self._sweep, self.gateway.follow_load])

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
                videos = await gateway.videos.purge_expired()
            except Exception as error:  # a store outage must not end the sweep
                logger.warning("artifact sweep failed: %r", error)
            else:
                if images or videos:
                    logger.info("removed %d expired images and %d expired videos", images, videos)
            await asyncio.sleep(settings.artifact_sweep_s)
