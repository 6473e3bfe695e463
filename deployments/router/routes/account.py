"""mediagate extensions on the caller's own account: ``GET /v1/usage`` and
``GET /v1/images`` (its stored images). Any key; only its own account's data."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from deployments.router.download_urls import download_base_url
from deployments.router.routes.dependencies import Caller, GatewayDep
from mediagate.jobs.gallery import GALLERY_KEEP
from mediagate.protocol.account import StoredImageList, UsageView

router = APIRouter()


@router.get("/v1/usage", response_model=UsageView)
async def usage(account: Caller, gateway: GatewayDep) -> UsageView:
    """Images used and left today, cooldown, when the quota resets, the tier's terms."""
    return await gateway.own_account.usage(account)


@router.get("/v1/images", response_model=StoredImageList)
async def stored_images(
    request: Request,
    account: Caller,
    gateway: GatewayDep,
    limit: int = Query(50, ge=1, le=GALLERY_KEEP),
) -> StoredImageList:
    """The account's images still stored (those asked for as URLs), newest first."""
    base_url = download_base_url(str(request.base_url), gateway.settings)
    return await gateway.own_account.images(account, base_url, limit)
