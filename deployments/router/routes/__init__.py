"""The HTTP surface, one module per API: images (and signed file downloads), videos,
models with status and health. ``create_api`` assembles them with the edge middleware
and the one error mapping; routes only read the request, call the gateway and shape
the answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from deployments.router.gateway import Gateway
from deployments.router.http_edge import EdgeMiddleware, install_error_handlers
from deployments.router.routes import account, console, images, models, ops, videos, webhooks
from mediagate.protocol.errors import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 410, 413, 429, 500, 503)
}


def create_api(
    gateway: Gateway, *, background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()
) -> FastAPI:
    """The router's FastAPI app over ``gateway``; ``background`` coroutines run for the
    app's lifetime (started and cancelled by its lifespan)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks: list[asyncio.Task[None]] = [asyncio.create_task(job()) for job in background]
        yield
        for task in tasks:
            task.cancel()

    app = FastAPI(title="mediagate", version="0.1.0", responses=ERROR_RESPONSES, lifespan=lifespan)
    app.state.gateway = gateway
    install_error_handlers(app)
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=gateway.settings.max_body_bytes,
        upload_paths={videos.UPLOAD_PATH, images.EDIT_PATH},
        max_upload_bytes=gateway.settings.max_upload_bytes,
    )
    for module in (images, videos, models, account, ops, webhooks):
        app.include_router(module.router)
    if gateway.settings.console:
        app.include_router(console.router)
    return app
