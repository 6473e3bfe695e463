"""Operator endpoints (``/v1/ops/*``): operator keys only, every other key gets 403.
The operations view's data, and live autoscaling limit changes (audited)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from deployments.router.operations import require_operator
from deployments.router.routes.dependencies import Caller, GatewayDep
from mediagate.access.accounts import Account
from mediagate.protocol.ops import LimitsChange, LimitsChanged, OpsStatus

router = APIRouter()


async def operator(account: Caller) -> Account:
    require_operator(account)
    return account


OperatorCaller = Annotated[Account, Depends(operator)]


@router.get("/v1/ops/status", response_model=OpsStatus)
async def ops_status(account: OperatorCaller, gateway: GatewayDep) -> OpsStatus:
    """Queues, decisions and waits per model and tier; replicas against their limits;
    the recent operator changes."""
    queues = (await gateway.status(account))["models"]
    return await gateway.ops.status(queues)


@router.post("/v1/ops/limits", response_model=LimitsChanged)
async def change_limits(
    request: Request, account: OperatorCaller, gateway: GatewayDep
) -> LimitsChanged:
    """Change one model's autoscaling limits live, checked as `mediagate scale set`
    checks them."""
    wanted = LimitsChange.model_validate_json(await request.body())
    return await gateway.ops.change_limits(account, wanted)
