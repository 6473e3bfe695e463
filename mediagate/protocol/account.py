"""mediagate extensions about the caller's own account (any key, its own data only):
``GET /v1/usage`` (what is used and left, and what the tier allows) and ``GET /v1/images``
(the account's stored images, the console's gallery)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class UsageView(BaseModel):
    """``GET /v1/usage``: the figures behind the ``x-ratelimit-*`` headers, and the
    tier's terms, so a client can show them before it is refused."""

    object: Literal["usage"] = "usage"
    account: str = Field(description="The account's name.")
    tier: str
    role: str = Field(description="The key's role: user or operator.")
    images_today: int
    images_per_day: int | None = Field(description="None: unlimited.")
    images_left_today: int | None = Field(description="None: unlimited.")
    day_resets_in_s: float = Field(description="Seconds until the quota day turns.")
    images_last_minute: int
    images_per_minute: int | None
    cooldown_left_s: float = Field(description="Seconds before the next image is allowed.")
    video_jobs_active: int
    video_jobs_at_once: int
    tier_terms: dict[str, Any] = Field(description="The tier's rules, as configured.")


class StoredImage(BaseModel):
    """One image of the account's that is still stored, with a fresh signed URL."""

    id: str
    object: Literal["image"] = "image"
    created_at: int
    model: str
    prompt: str
    size: str
    kind: str = Field(description="image_generation or image_edit")
    url: str
    expires_at: int = Field(description="Unix time the file (and the URL) goes away.")


class StoredImageList(BaseModel):
    """``GET /v1/images``: newest first."""

    object: Literal["list"] = "list"
    data: list[StoredImage]
