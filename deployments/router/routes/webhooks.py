"""Webhook endpoints of the caller's own account (a mediagate extension): register,
list and remove. Events are delivered by the ``Webhooks`` deployment."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deployments.router.routes.dependencies import Caller, GatewayDep, request_body
from mediagate.protocol.errors import NotFound
from mediagate.protocol.webhooks import (
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointList,
    WebhookEndpointView,
)

router = APIRouter()


@router.post(
    "/v1/webhooks",
    response_model=WebhookEndpointView,
    response_model_exclude_none=True,
    openapi_extra=request_body(WebhookEndpointCreate, "application/json"),
)
async def add_webhook(
    request: Request, account: Caller, gateway: GatewayDep
) -> WebhookEndpointView:
    """Register an endpoint for ``video.completed`` / ``video.failed``; the answer
    carries its signing secret (``whsec_...``), shown this once."""
    wanted = WebhookEndpointCreate.model_validate_json(await request.body())
    return await gateway.webhooks.add(account.id, wanted)


@router.get("/v1/webhooks", response_model=WebhookEndpointList, response_model_exclude_none=True)
async def list_webhooks(account: Caller, gateway: GatewayDep) -> WebhookEndpointList:
    """The account's endpoints, with whether each is enabled (secrets are not shown)."""
    endpoints = await gateway.webhooks.list(account.id)
    return WebhookEndpointList(data=[endpoint.view() for endpoint in endpoints])


@router.delete("/v1/webhooks/{endpoint_id}", response_model=WebhookEndpointDeleted)
async def remove_webhook(
    endpoint_id: str, account: Caller, gateway: GatewayDep
) -> WebhookEndpointDeleted:
    """Stop sending to an endpoint; events not yet delivered to it are dropped."""
    if not await gateway.webhooks.remove(account.id, endpoint_id):
        raise NotFound(f"no webhook endpoint {endpoint_id!r}", param="endpoint_id")
    return WebhookEndpointDeleted(id=endpoint_id)
