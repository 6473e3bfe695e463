"""OpenAI Videos: ``/v1/videos`` (create, JSON or multipart; list; get; delete;
content; remix)."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from deployments.router.http_edge import invalid_request_from
from deployments.router.routes.dependencies import (
    Caller,
    GatewayDep,
    idempotent,
    request_body,
    video_response,
)
from deployments.router.video_uploads import parse_video_form
from mediagate.protocol.errors import InvalidRequest
from mediagate.protocol.videos import (
    VideoCreateRequest,
    VideoDeleted,
    VideoList,
    VideoObject,
    VideoRemixRequest,
)
from mediagate.stores import ListOrder
from mediagate.stores.records import VideoVariant

UPLOAD_PATH = "/v1/videos"  # takes image uploads: its own, larger body limit
router = APIRouter()

# What a client can do next with the job a create or remix returns (OpenAPI links, which
# schema-driven clients and stateful fuzzers follow).
_JOB = {"video_id": "$response.body#/id"}
JOB_LINKS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The video job.",
        "links": {
            "GetVideo": {"operationId": "getVideo", "parameters": _JOB},
            "DownloadVideoContent": {"operationId": "downloadVideoContent", "parameters": _JOB},
            "RemixVideo": {"operationId": "remixVideo", "parameters": _JOB},
            "DeleteVideo": {"operationId": "deleteVideo", "parameters": _JOB},
        },
    }
}


@router.post(
    UPLOAD_PATH,
    response_model=VideoObject,
    operation_id="createVideo",
    responses=JOB_LINKS,
    openapi_extra=request_body(VideoCreateRequest, "application/json", "multipart/form-data"),
)
async def create_video(request: Request, account: Caller, gateway: GatewayDep) -> JSONResponse:
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
        response = video_response(gateway, job)
        response.headers.update(headers)
        return response, job.id

    return await idempotent(gateway, request, account, payload, produce)


@router.get("/v1/videos", response_model=VideoList, operation_id="listVideos")
async def list_videos(
    account: Caller,
    gateway: GatewayDep,
    after: Annotated[str | None, Query(description="Last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    order: Annotated[ListOrder, Query(description="By creation time.")] = "desc",
) -> VideoList:
    return await gateway.videos.list(account, after=after, limit=limit, order=order)


@router.get("/v1/videos/{video_id}", response_model=VideoObject, operation_id="getVideo")
async def get_video(video_id: str, account: Caller, gateway: GatewayDep) -> JSONResponse:
    job = await gateway.videos.get(account, video_id)
    position = await gateway.videos.queue_position(job)
    return video_response(gateway, job, queue_position=position)


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted, operation_id="deleteVideo")
async def delete_video(video_id: str, account: Caller, gateway: GatewayDep) -> VideoDeleted:
    return await gateway.videos.delete(account, video_id)


@router.get("/v1/videos/{video_id}/content", operation_id="downloadVideoContent")
async def video_content(
    video_id: str,
    account: Caller,
    gateway: GatewayDep,
    variant: Annotated[VideoVariant, Query(description="video, thumbnail or spritesheet.")] = (
        "video"
    ),
) -> Response:
    data, media_type = await gateway.videos.content(account, video_id, variant)
    return Response(data, media_type=media_type, headers={"cache-control": "private"})


@router.post(
    "/v1/videos/{video_id}/remix",
    response_model=VideoObject,
    operation_id="remixVideo",
    responses=JOB_LINKS,
    openapi_extra=request_body(VideoRemixRequest, "application/json"),
)
async def remix_video(
    video_id: str, request: Request, account: Caller, gateway: GatewayDep
) -> JSONResponse:
    body = VideoRemixRequest.model_validate_json(await request.body())

    async def produce() -> tuple[JSONResponse, str | None]:
        job, headers = await gateway.videos.remix(account, video_id, body)
        response = video_response(gateway, job)
        response.headers.update(headers)
        return response, job.id

    return await idempotent(gateway, request, account, body.model_dump(mode="json"), produce)
