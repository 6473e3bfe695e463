"""What a key may see of its own account: its usage and tier terms (``GET /v1/usage``)
and its stored images (``GET /v1/images``, remembered as they are made:
``mediagate.jobs.gallery``). Nothing here reads another account's data."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from deployments.router.services import RouterServices
from mediagate.access.accounts import Account
from mediagate.jobs.gallery import (
    GALLERY_DOCUMENT,
    PROMPT_KEPT_CHARS,
    GalleryEntry,
    added,
    listed,
)
from mediagate.protocol.account import StoredImage, StoredImageList, UsageView
from mediagate.protocol.work import ImageJob
from mediagate.stores import JobStore

logger = logging.getLogger(__name__)


class AccountRouter(RouterServices, Protocol):
    jobs: JobStore


class AccountViews:
    def __init__(self, gateway: AccountRouter) -> None:
        self.gateway = gateway

    async def usage(self, account: Account) -> UsageView:
        usage = await self.gateway.guard.ledger.usage(account)
        tier = self.gateway.policy.tier(account.tier)
        left = None
        if usage.images_per_day is not None:
            left = max(0, usage.images_per_day - usage.images_today)
        return UsageView(
            account=account.name,
            tier=account.tier,
            role=account.role,
            images_today=usage.images_today,
            images_per_day=usage.images_per_day,
            images_left_today=left,
            day_resets_in_s=round(usage.day_resets_in_s, 1),
            images_last_minute=usage.images_last_minute,
            images_per_minute=usage.images_per_minute,
            cooldown_left_s=round(usage.cooldown_left_s, 1),
            video_jobs_active=usage.video_jobs_active,
            video_jobs_at_once=usage.video_jobs_at_once,
            tier_terms=tier.model_dump(mode="json", exclude={"fail_open_images_per_minute"}),
        )

    async def remember(self, job: ImageJob, model: str, kind: str, artifact_ids: list[str]) -> None:
        """Add stored images to their account's gallery; the images are delivered
        whether or not this write succeeds."""
        now = self.gateway.clock()
        entries = [
            GalleryEntry(
                id=artifact_id,
                created_at=now,
                model=model,
                prompt=job.prompt[:PROMPT_KEPT_CHARS],
                size=f"{job.width}x{job.height}",
                kind=kind,
            )
            for artifact_id in artifact_ids
        ]
        kept_s = self.gateway.settings.url_ttl_s
        try:
            await self.gateway.jobs.mutate(
                job.account_id, GALLERY_DOCUMENT, added(entries, kept_s, now), ttl_s=kept_s
            )
        except Exception as error:
            logger.warning("images not added to the gallery: %r", error)

    async def images(self, account: Account, base_url: str, limit: int) -> StoredImageList:
        now = self.gateway.clock()
        kept_s = self.gateway.settings.url_ttl_s
        text = await self.gateway.jobs.mutate(
            account.id, GALLERY_DOCUMENT, lambda current: (current, current)
        )
        entries = listed(text, kept_s, now)[:limit]

        def signed(entry: GalleryEntry) -> StoredImage:
            left_s = max(10, int(entry.created_at + kept_s - now))
            return StoredImage(
                id=entry.id,
                created_at=int(entry.created_at),
                model=entry.model,
                prompt=entry.prompt,
                size=entry.size,
                kind=entry.kind,
                url=self.gateway.artifacts.url(entry.id, left_s, base_url),
                expires_at=int(entry.created_at + kept_s),
            )

        return StoredImageList(data=await asyncio.to_thread(lambda: list(map(signed, entries))))
