"""OpenAI Models (``/v1/models``), the queue status for humans and scripts, and health."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from deployments.router.routes.dependencies import Caller, GatewayDep
from mediagate.protocol.listing import ModelList, ModelObject

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(_: Caller, gateway: GatewayDep) -> ModelList:
    return ModelList(data=[gateway.model_object(spec) for spec in gateway.served_models()])


@router.get("/v1/models/{model_id}", response_model=ModelObject)
async def get_model(model_id: str, _: Caller, gateway: GatewayDep) -> ModelObject:
    return gateway.model_object(gateway.model(model_id))


@router.get("/v1/status")
async def status(account: Caller, gateway: GatewayDep) -> JSONResponse:
    """Queues, capacity, wait estimates and shedding per model and tier (no secrets,
    nothing about other accounts)."""
    return JSONResponse(await gateway.status(account))


@router.get("/healthz")
async def health(gateway: GatewayDep) -> JSONResponse:
    return JSONResponse({"status": "ok", "models": sorted(gateway.schedulers)})
