"""What every HTTP request passes through: ids, body limits, and the one error mapping.

``EdgeMiddleware`` is plain ASGI and the outermost layer: it gives each request one
``x-request-id`` (Serve's, when Serve's ingress already gave it one), refuses headers
over HAProxy's limits with 431 (Serve's Python proxy enforces none of its own), refuses
bodies over the limit with 413 without reading them whole (chunked bodies included), and
turns anything unexpected into a 500 envelope that hides internals.
``error_response`` is the only place a domain error becomes HTTP.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Collection
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mediagate.protocol.errors import (
    HeadersTooLarge,
    InvalidRequest,
    MediagateError,
    NotFound,
    PayloadTooLarge,
    unwrap,
)

logger = logging.getLogger(__name__)

HANDLED_MS_HEADER = "x-mediagate-handled-ms"
DECISION_MS_HEADER = "x-mediagate-decision-ms"
REQUEST_ID_HEADER = "x-request-id"
# An incoming request id we adopt (Serve's proxy or HAProxy sets one, or the client
# sent it); anything else is replaced, so logs and error bodies carry no injected text.
USABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def running_in_serve() -> bool:
    """Inside a Serve replica, whose HTTP ingress (the proxy actor, or HAProxy in the
    throughput mode) gives every request an ``x-request-id`` and echoes it on the answer."""
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:
        return False
    return True


def incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            return text if USABLE_REQUEST_ID.fullmatch(text) else None
    return None


def error_headers(error: MediagateError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_s)))
        headers["retry-after-ms"] = str(max(1, math.ceil(error.retry_after_s * 1000)))
    if error.should_retry is not None:
        headers["x-should-retry"] = "true" if error.should_retry else "false"
    return headers


def error_response(error: MediagateError) -> JSONResponse:
    """A domain error as OpenAI's envelope with its status and retry headers."""
    return JSONResponse(error.envelope(), status_code=error.status, headers=error_headers(error))


def invalid_request_from(errors: list[Any]) -> InvalidRequest:
    """The first pydantic error as a 400 naming the field (``body``/``query`` prefixes dropped)."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return InvalidRequest("the request body is not valid JSON", code="invalid_json")
    if kind == "extra_forbidden":
        return InvalidRequest(f"unknown parameter `{param}`", param=param, code="unknown_parameter")
    if kind == "missing":
        return InvalidRequest(
            f"missing required parameter `{param}`", param=param, code="missing_required_parameter"
        )
    if kind == "model_type":
        return InvalidRequest("the request body must be a JSON object", code="invalid_type")
    return InvalidRequest(f"invalid value for `{param}`: {first.get('msg')}", param=param)


# What counts as a refusal of an authenticated caller (quota, cooldown, rate, tier
# gates, shedding, and moderation's 400s), counted per tier and code
# (``Gateway.on_refusal``).
REFUSAL_STATUSES = frozenset({403, 429, 503})
COUNTED_CODES = frozenset({"moderation_blocked"})


def install_error_handlers(app: FastAPI) -> None:
    """Map every error FastAPI can raise onto the envelope."""

    @app.exception_handler(MediagateError)
    async def _domain(request: Request, error: MediagateError) -> JSONResponse:
        tier = getattr(request.state, "tier", None)  # set once the key is known
        counted = not request.url.path.startswith("/v1/ops/")  # users' work only
        refusal = error.status in REFUSAL_STATUSES or error.code in COUNTED_CODES
        if refusal and tier is not None and counted:
            try:
                request.app.state.gateway.on_refusal(tier, error.code or error.type)
            except Exception:  # a count lost, not the answer
                logger.exception("refusal not counted")
        return error_response(error)

    @app.exception_handler(ValidationError)
    async def _pydantic(_: Request, error: ValidationError) -> JSONResponse:
        return error_response(invalid_request_from(error.errors()))

    @app.exception_handler(RequestValidationError)
    async def _fastapi(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request_from(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _routing(_: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return error_response(NotFound("no such endpoint", code="unknown_url"))
        wrapped: MediagateError = (
            InvalidRequest(str(error.detail), code="http_error")
            if error.status_code < 500
            else MediagateError(str(error.detail), code="http_error")
        )
        return JSONResponse(wrapped.envelope(), status_code=error.status_code)


# HAProxy's defaults (tune.bufsize 16 KiB holds the whole header block; tune.http.maxhdr
# 101 lines), so both ingresses refuse the same requests.
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100


def headers_too_large(scope: Scope) -> HeadersTooLarge | None:
    headers = scope.get("headers", [])
    if len(headers) > MAX_HEADERS:
        return HeadersTooLarge(f"a request may carry at most {MAX_HEADERS} headers")
    if sum(len(name) + len(value) + 4 for name, value in headers) > MAX_HEADER_BYTES:
        return HeadersTooLarge(f"request headers exceed the limit of {MAX_HEADER_BYTES} bytes")
    return None


class _BodyTooLarge(Exception):
    pass


class EdgeMiddleware:
    """Request ids, the body size limit, and a last-resort 500 in the envelope.

    One id per request, the same in the header, the error body and the logs: behind
    Serve's ingress, the one it gave the request (Serve adds the response header itself);
    elsewhere (tests, another ASGI server) one of ours, which this middleware adds.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        upload_paths: Collection[str] = (),
        max_upload_bytes: int | None = None,
        ingress_sets_request_id: bool | None = None,
    ) -> None:
        self.app = app
        self.ingress_sets_request_id = (
            running_in_serve() if ingress_sets_request_id is None else ingress_sets_request_id
        )
        self.max_body_bytes = max_body_bytes
        # Endpoints that take file uploads (multipart) get their own, larger limit.
        self.upload_paths = frozenset(upload_paths)
        self.max_upload_bytes = max_upload_bytes or max_body_bytes

    def _limit_for(self, scope: Scope) -> int:
        path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
        if root and path.startswith(root):  # mounted under a route prefix
            path = path[len(root) :]
        return self.max_upload_bytes if path in self.upload_paths else self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = incoming_request_id(scope) if self.ingress_sets_request_id else None
        request_id = given or f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = False
        arrived = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if given is None:  # else Serve's ingress adds it (the same id)
                    headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                # Time spent in the router (and what it waited on) for this answer.
                handled_ms = f"{(time.perf_counter() - arrived) * 1000:.2f}"
                headers.append((HANDLED_MS_HEADER.encode(), handled_ms.encode()))
                # Image generation: the router's own time to refuse or forward the request.
                decision_ms = scope["state"].get("decision_ms")
                if decision_ms is not None:
                    headers.append((DECISION_MS_HEADER.encode(), f"{decision_ms:.3f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        too_many = headers_too_large(scope)
        if too_many is not None:
            await self._send_error(send_with_id, too_many)
            return
        limit = self._limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._send_error(send_with_id, self._too_large(limit))
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send_with_id)
        except Exception as error:
            if started:
                raise
            if isinstance(unwrap(error), _BodyTooLarge):
                await self._send_error(send_with_id, self._too_large(limit))
                return
            logger.exception("unhandled error in request %s", request_id)
            internal = MediagateError(
                f"internal server error; quote request id {request_id} when reporting it",
                code="internal_error",
            )
            await self._send_error(send_with_id, internal)

    @staticmethod
    def _too_large(limit: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")

    @staticmethod
    async def _send_error(send: Send, error: MediagateError) -> None:
        body = json.dumps(error.envelope()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        headers += [(k.encode(), v.encode()) for k, v in error_headers(error).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
