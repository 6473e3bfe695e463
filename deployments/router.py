"""Router: the FastAPI ingress. Thin by design, and free of torch and diffusers.

Authenticate the key, resolve the model, validate the request against the
model's caps, hand the job to that model's scheduler, and encode the answer
(inline base64 or a signed URL). Every error leaves through ``http_edge``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from deployments.errors import InvalidRequest, NotFound, Unauthorized
from deployments.http_edge import EdgeMiddleware, install_error_handlers
from deployments.jobs import ImageJob, ImageResult
from deployments.protocol import (
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    ModelObject,
)
from mediagate.accounts import Account, SqliteAccountStore
from mediagate.artifacts import LocalArtifactStore, load_or_create_secret
from mediagate.settings import HomeLayout
from models.catalog import Catalog, ModelSpec, load_catalog

logger = logging.getLogger(__name__)

MAX_SEED_DRAWN = 2**32 - 1
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 500, 503)
}


class RouterSettings(BaseModel):
    """Limits at the edge; part of the typed application arguments."""

    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger bodies get 413.")
    max_prompt_chars: int = Field(4000, ge=1, description="Longer prompts get 400.")
    url_ttl_s: int = Field(3600, ge=10, description="Lifetime of image URLs.")
    artifact_sweep_s: float = Field(300, gt=0, description="How often expired files are removed.")


class Gateway:
    """The router's behaviour, independent of Ray: tests drive it with fake handles."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        schedulers: Mapping[str, Any],
        accounts: Any,
        artifacts: LocalArtifactStore,
        settings: RouterSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.schedulers = dict(schedulers)
        self.accounts = accounts
        self.artifacts = artifacts
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

    def image_model(self, model_id: str | None) -> ModelSpec:
        if model_id is None:
            default = self.catalog.default_for("text-to-image")
            if default is None or default.id not in self.schedulers:
                raise InvalidRequest("no default image model is served; set `model`", param="model")
            return default
        spec = self.model(model_id)
        if spec.task != "text-to-image":
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
        spec = self.image_model(body.model)
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
            artifact_id = self.artifacts.put(image, body.output_format)
            path = self.artifacts.signed_path(artifact_id, self.settings.url_ttl_s)
            data.append(ImageData(url=base_url.rstrip("/") + path))
        return data

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
    app.add_middleware(EdgeMiddleware, max_body_bytes=gateway.settings.max_body_bytes)

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
        data = await asyncio.to_thread(
            gateway.artifacts.read_signed, artifact_id, expires, signature
        )
        extension = artifact_id.rsplit(".", 1)[-1]
        media_type = "video/mp4" if extension == "mp4" else f"image/{extension}"
        return Response(data, media_type=media_type, headers={"cache-control": "private"})

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
        catalog: str | None = None,
        settings: dict[str, Any] | None = None,
        accounts: Any = None,
        artifacts: LocalArtifactStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        layout = HomeLayout(home)
        router_settings = RouterSettings.model_validate(settings or {})
        if artifacts is None:
            secret = load_or_create_secret(layout.secrets / "url_signing_key")
            artifacts = LocalArtifactStore(layout.artifacts, secret, clock=clock)
        self.gateway = Gateway(
            catalog=load_catalog(catalog),
            schedulers=schedulers,
            accounts=accounts or SqliteAccountStore(layout.state_db, clock=clock),
            artifacts=artifacts,
            settings=router_settings,
            clock=clock,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.gateway, background=[self._sweep_artifacts])

    async def _sweep_artifacts(self) -> None:
        """Delete files whose URLs have expired (with a minute's grace)."""
        settings = self.gateway.settings
        while True:
            removed = await asyncio.to_thread(
                self.gateway.artifacts.delete_older_than, settings.url_ttl_s + 60
            )
            if removed:
                logger.info("removed %d expired artifacts", removed)
            await asyncio.sleep(settings.artifact_sweep_s)
