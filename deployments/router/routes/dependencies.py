"""What routes take from FastAPI, typed: the gateway, the authenticated caller, and the
Idempotency-Key handling every creating POST shares."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, cast

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from deployments.router.gateway import Gateway
from mediagate.access.accounts import Account
from mediagate.access.idempotency import check_key, fingerprint, keep_answer, kept_body
from mediagate.stores import VideoJobRecord

POLL_AFTER_HEADER = "openai-poll-after-ms"

logger = logging.getLogger(__name__)


def request_body(model: type[BaseModel], *media_types: str) -> dict[str, Any]:
    """The ``openapi_extra`` of a route that reads its body itself: ``model``'s schema
    with its nested definitions inlined (a ``#/$defs/...`` reference would point into
    the OpenAPI document's root, where nothing is, and schema-driven clients and
    fuzzers then cannot build a body)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline({**definitions[reference.removeprefix("#/$defs/")], **rest})
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    body = inline(schema)
    return {
        "requestBody": {
            "required": True,
            "content": {media_type: {"schema": body} for media_type in media_types},
        }
    }


async def gateway_of(request: Request) -> Gateway:
    # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop per
    # request for an attribute read.
    return cast(Gateway, request.app.state.gateway)


GatewayDep = Annotated[Gateway, Depends(gateway_of)]


async def authenticated(request: Request, gateway: GatewayDep) -> Account:
    """The caller's account from ``Authorization: Bearer KEY`` (401 otherwise); its
    tier is kept on the request, for the refusal counts of the error mapping."""
    account = await gateway.authenticate(request.headers.get("authorization"))
    request.state.tier = account.tier
    return account


Caller = Annotated[Account, Depends(authenticated)]


def video_response(
    gateway: Gateway, job: VideoJobRecord, *, queue_position: int | None = None
) -> JSONResponse:
    """A job as the client sees it, with the header that paces its polling."""
    body = gateway.videos.to_object(job, queue_position=queue_position).model_dump(mode="json")
    return JSONResponse(body, headers={POLL_AFTER_HEADER: str(gateway.settings.poll_after_ms)})


Produce = Callable[[], Awaitable[tuple[JSONResponse, str | None]]]


async def idempotent(
    gateway: Gateway, request: Request, account: Account, payload: Any, produce: Produce
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
            job = await gateway.videos.get(account, answer.video_id)
            response = video_response(gateway, job)
            response.headers.update(replayed)
            return response
        return JSONResponse(
            await asyncio.to_thread(kept_body, gateway.artifacts, answer),
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
    try:
        stored = await asyncio.to_thread(
            keep_answer,
            gateway.artifacts,
            response.status_code,
            bytes(response.body),
            kept,
            video_id,
        )
    except Exception as error:  # the answer is good: send it, without a key to replay it
        logger.warning("the answer to an Idempotency-Key could not be kept: %r", error)
        await gateway.idempotency.release(account.id, key, claim.claim_id)
        return response
    await gateway.idempotency.complete(account.id, key, claim.claim_id, digest, stored)
    return response
