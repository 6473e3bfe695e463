"""OpenAI Images: ``POST /v1/images/generations`` and ``POST /v1/images/edits``, and the
signed downloads of images answered as URLs."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from deployments.router.download_urls import download_base_url
from deployments.router.edit_uploads import parse_edit_form
from deployments.router.http_edge import invalid_request_from
from deployments.router.routes.dependencies import (
    GatewayDep,
    authenticated,
    idempotent,
    request_body,
)
from mediagate.protocol.errors import NotFound
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
async def generate_images(request: Request, gateway: GatewayDep) -> JSONResponse:
    raw = await request.body()
    received = time.perf_counter()

    def decided() -> None:  # the router's own time to refuse or forward, no transport
        request.state.decision_ms = (time.perf_counter() - received) * 1000

    # Authenticated here, not as a dependency: the decision time includes it.
    account = await authenticated(request, gateway)
    body = ImageGenerationRequest.model_validate_json(raw)

    async def produce() -> tuple[JSONResponse, str | None]:
        response, headers = await gateway.images.generate(
            account,
            body,
            request_id=request.state.request_id,
            base_url=download_base_url(str(request.base_url), gateway.settings),
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
async def edit_images(request: Request, gateway: GatewayDep) -> JSONResponse:
    account = await authenticated(request, gateway)  # before the upload is read
    fields, uploads = await parse_edit_form(request)
    received = time.perf_counter()
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as error:
        raise invalid_request_from(error.errors()) from None

    async def produce() -> tuple[JSONResponse, str | None]:
        response, headers = await gateway.images.edit(
            account,
            body,
            uploads,
            request_id=request.state.request_id,
            base_url=download_base_url(str(request.base_url), gateway.settings),
            received=received,
        )
        content = response.model_dump(mode="json", exclude_none=True)
        return JSONResponse(content, headers=headers), None

    payload = {"body": body.model_dump(mode="json"), "uploads": uploads.fingerprint()}
    return await idempotent(gateway, request, account, payload, produce)


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
        data, media_type=content_type(artifact_id), headers={"cache-control": "private"}
    )
