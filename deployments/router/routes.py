"""The HTTP surface: OpenAI Images, Videos and Models, signed file downloads, status and
health. Routes only: each reads the request, calls the gateway and shapes the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from deployments.router.gateway import Gateway
from deployments.router.http_edge import (
    EdgeMiddleware,
    install_error_handlers,
    invalid_request_from,
)
from deployments.router.videos import parse_video_form
from mediagate.access.accounts import Account
from mediagate.access.idempotency import StoredAnswer, check_key, fingerprint
from mediagate.protocol.errors import (
    ErrorResponse,
    InvalidRequest,
    NotFound,
)
from mediagate.protocol.images import ImageGenerationRequest, ImagesResponse
from mediagate.protocol.listing import ModelList, ModelObject
from mediagate.protocol.videos import (
    VideoCreateRequest,
    VideoDeleted,
    VideoList,
    VideoObject,
    VideoRemixRequest,
)
from mediagate.stores import (
    ListOrder,
    VideoJobRecord,
)
from mediagate.stores.artifacts import (
    LocalArtifactStore,
    content_type,
)
from mediagate.stores.records import VideoVariant

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 410, 413, 429, 500, 503)
}


POLL_AFTER_HEADER = "openai-poll-after-ms"


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
