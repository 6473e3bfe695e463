"""OpenAI Images: ``POST /v1/images/generations`` and ``POST /v1/images/edits``, and the
signed downloads of images answered as URLs."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from deployments.router.download_urls import download_base_url
from deployments.router.edit_uploads import parse_edit_form
from deployments.router.gateway import Gateway
from deployments.router.http_edge import invalid_request_from
from deployments.router.image_streams import start_image_stream
from deployments.router.images import ImageWork
from deployments.router.routes.dependencies import (
    GatewayDep,
    authenticated,
    idempotent,
    request_body,
)
from deployments.streams import finish_regardless
from mediagate.access.accounts import Account
from mediagate.protocol.errors import InvalidRequest, NotFound
from mediagate.protocol.image_stream import STREAM_MEDIA_TYPE
from mediagate.protocol.images import ImageEditRequest, ImageGenerationRequest, ImagesResponse
from mediagate.stores.artifacts import LocalArtifactStore, content_type

EDIT_PATH = "/v1/images/edits"  # takes image uploads: its own, larger body limit
router = APIRouter()


def _edit_body() -> dict[str, object]:
    """The edit form's schema: its fields, and the files the client uploads."""
    extra = request_body(ImageEditRequest, "multipart/form-data")
    schema = extra["requestBody"]["content"]["multipart/form-data"]["schema"]
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {
        "image": {**binary, "description": "The image to edit (PNG, JPEG or WebP)."},
        "image[]": {"type": "array", "items": binary, "description": "Images, as a list."},
        "mask": {**binary, "description": "PNG with alpha: edit where it is transparent."},
        **schema["properties"],
    }
    return extra


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    openapi_extra=request_body(ImageGenerationRequest, "application/json"),
)
async def generate_images(request: Request, gateway: GatewayDep) -> Response:
    raw = await request.body()
    received = time.perf_counter()

    def decided() -> None:  # the router's own time to refuse or forward, no transport
        request.state.decision_ms = (time.perf_counter() - received) * 1000

    # Authenticated here, not as a dependency: the decision time includes it.
    account = await authenticated(request, gateway)
    body = ImageGenerationRequest.model_validate_json(raw)
    base_url = download_base_url(str(request.base_url), gateway.settings)
    request_id = request.state.request_id
    if body.stream:
        refuse_replaying_streams(request)
        try:
            work = gateway.images.generation(
                account, body, request_id=request_id, base_url=base_url
            )
        finally:
            decided()
        return await event_stream(gateway, account, work)

    async def produce() -> tuple[JSONResponse, str | None]:
        response, headers = await gateway.images.generate(
            account,
            body,
            request_id=request_id,
            base_url=base_url,
            decided=decided,
            received=received,
        )
        content = response.model_dump(mode="json", exclude_none=True)
        return JSONResponse(content, headers=headers), None

    return await idempotent(gateway, request, account, body.model_dump(mode="json"), produce)


@router.post(
    EDIT_PATH,
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    operation_id="createImageEdit",
    openapi_extra=_edit_body(),
)
async def edit_images(request: Request, gateway: GatewayDep) -> Response:
    account = await authenticated(request, gateway)  # before the upload is read
    fields, uploads = await parse_edit_form(request)
    received = time.perf_counter()
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as error:
        raise invalid_request_from(error.errors()) from None
    base_url = download_base_url(str(request.base_url), gateway.settings)
    if body.stream:
        refuse_replaying_streams(request)
        work = gateway.images.edit(
            account, body, uploads, request_id=request.state.request_id, base_url=base_url
        )
        return await event_stream(gateway, account, work)

    async def produce() -> tuple[JSONResponse, str | None]:
        work = gateway.images.edit(
            account, body, uploads, request_id=request.state.request_id, base_url=base_url
        )
        response, headers = await gateway.images.run(account, work, received=received)
        content = response.model_dump(mode="json", exclude_none=True)
        return JSONResponse(content, headers=headers), None

    payload = {"body": body.model_dump(mode="json"), "uploads": uploads.fingerprint()}
    return await idempotent(gateway, request, account, payload, produce)


def refuse_replaying_streams(request: Request) -> None:
    """A streamed answer is not kept, so it cannot be replayed for a repeated key."""
    if request.headers.get("idempotency-key") is not None:
        raise InvalidRequest(
            "`Idempotency-Key` cannot be used with `stream`: a stream is not kept to be "
            "replayed; send the request unstreamed to make it idempotent",
            param="stream",
        )


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose producer always finishes (and settles the quota), however
    the response ends: a client that leaves mid-stream closes it at once."""

    media_type = STREAM_MEDIA_TYPE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # however it ended: not started, cancelled, or the client gone
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await finish_regardless(close())


async def event_stream(gateway: Gateway, account: Account, work: ImageWork) -> Response:
    events, headers = await start_image_stream(gateway.images, account, work)
    # no-cache, and no buffering by a proxy that would hold the previews back
    headers |= {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return EventStreamResponse(events, headers=headers)


@router.get("/v1/files/{artifact_id}/content")
async def download(
    artifact_id: str,
    gateway: GatewayDep,
    expires: int = Query(...),
    signature: str = Query(...),
) -> Response:
    """A signed, expiring image download (local files; S3 hands out presigned URLs)."""
    if not isinstance(gateway.artifacts, LocalArtifactStore):  # S3 URLs go to S3
        raise NotFound(f"no file {artifact_id!r}", param="file_id")
    data = await asyncio.to_thread(gateway.artifacts.read_signed, artifact_id, expires, signature)
    return Response(
        data,
        media_type=content_type(artifact_id),
        headers={"cache-control": "private", "x-content-type-options": "nosniff"},
    )
