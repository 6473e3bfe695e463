"""The tier policy: data (a YAML file) mapped onto frozen models.

Per tier: images per day, a cooldown rule, images per minute, video access, how
many video jobs may run at once, caps on request sizes, the priority class and
the longest queue wait. Tiers are names, so operators add new ones without code.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mediagate.protocol.errors import Forbidden, InvalidRequest


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CooldownRule(_Frozen):
    """After ``after_images`` images within ``window_min`` minutes, wait ``wait_min`` minutes."""

    after_images: int = Field(ge=1, description="Images in one burst.")
    window_min: float = Field(gt=0, description="Minutes a burst is counted over.")
    wait_min: float = Field(gt=0, description="Minutes to wait after a full burst.")


class VideoAccess(_Frozen):
    """Whether the tier may create videos, and from what account age."""

    enabled: bool = Field(False, description="Video generation open to this tier.")
    min_account_age_days: float = Field(0, ge=0, description="Younger accounts are refused.")


class ModerationAccess(_Frozen):
    """How strictly the tier's prompts, uploads and outputs are checked."""

    default: Literal["auto", "low"] = Field("auto", description="Level when none is asked.")
    allow_low: bool = Field(False, description="Requests may ask for `moderation: low`.")


class TierCaps(_Frozen):
    """Largest requests the tier may make (on top of each model's own caps)."""

    max_n: int | None = Field(None, ge=1, description="Images per request.")
    max_side: int | None = Field(None, ge=8, description="Largest width or height, pixels.")
    max_steps: int | None = Field(None, ge=1, description="Denoising steps per request.")
    max_seconds: int | None = Field(None, ge=1, description="Video length.")
    max_partial_images: int | None = Field(
        None, ge=0, le=3, description="Streamed previews per image (each is a VAE decode)."
    )
    max_input_images: int | None = Field(None, ge=1, description="Images uploaded per edit.")
    max_input_pixels: int | None = Field(
        None, ge=64, description="Pixels of each uploaded image (width x height)."
    )


class Tier(_Frozen):
    """One tier's limits; ``None`` means unlimited."""

    images_per_day: int | None = Field(None, ge=0, description="Images per quota day.")
    cooldown: CooldownRule | None = Field(None, description="Burst rule.")
    images_per_minute: int | None = Field(None, ge=1, description="Sliding 60 s rate.")
    video: VideoAccess = Field(default_factory=VideoAccess)
    video_jobs_at_once: int = Field(0, ge=0, description="Video jobs queued or running at once.")
    caps: TierCaps = Field(default_factory=TierCaps)
    moderation: ModerationAccess = Field(default_factory=ModerationAccess)
    priority_class: int = Field(0, ge=0, description="Higher is served first.")
    max_queue_wait_s: float = Field(60, gt=0, description="Longest wait before shedding.")
    max_queued: int | None = Field(
        None, ge=0, description="Requests of this tier queued per model before shedding."
    )
    fail_open_images_per_minute: int = Field(
        0,
        ge=0,
        description="While the state store is down: images per minute per account admitted "
        "by each router replica without a ledger (0 = fail closed, 503).",
    )


class TierPolicy(_Frozen):
    """Every tier, the quota day's time zone and the tier of new accounts."""

    timezone: str = Field("UTC", description="IANA zone in which a quota day is a calendar day.")
    default_tier: str = Field("free", description="Tier of accounts created without one.")
    tiers: dict[str, Tier] = Field(description="Tier name -> limits.")

    @field_validator("timezone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _default_exists(self) -> TierPolicy:
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not among the tiers")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def lowest_priority_class(self) -> int:
        """The class served last and shed first (the free tier's, as shipped)."""
        return min(tier.priority_class for tier in self.tiers.values())

    def tier(self, name: str) -> Tier:
        """The tier called ``name``; an unknown name (a tier since removed) is the default's."""
        return self.tiers.get(name) or self.tiers[self.default_tier]


def parse_tier_policy(data: dict[str, Any]) -> TierPolicy:
    return TierPolicy.model_validate(data)


def shipped_tier_config() -> dict[str, Any]:
    """The tier file shipped with mediagate, as data (to load, or to change and write)."""
    text = resources.files("mediagate").joinpath("configs/tiers.yaml").read_text()
    return dict(yaml.safe_load(text) or {})


def load_tier_policy(path: str | Path | None = None) -> TierPolicy:
    """Read a tier file; ``None`` reads the defaults shipped with mediagate."""
    if path is None:
        return parse_tier_policy(shipped_tier_config())
    return parse_tier_policy(yaml.safe_load(Path(path).read_text()) or {})


def check_image_caps(
    tier_name: str,
    tier: Tier,
    *,
    n: int,
    width: int,
    height: int,
    steps: int,
    partial_images: int = 0,
) -> None:
    """400 naming the field when an image request exceeds the tier's caps."""
    caps = tier.caps
    if caps.max_n is not None and n > caps.max_n:
        raise InvalidRequest(
            f"the {tier_name} tier makes at most {caps.max_n} image(s) per request, got n={n}",
            param="n",
        )
    if caps.max_partial_images is not None and partial_images > caps.max_partial_images:
        raise InvalidRequest(
            f"the {tier_name} tier streams at most {caps.max_partial_images} partial image(s), "
            f"got partial_images={partial_images}",
            param="partial_images",
        )
    _check_common(tier_name, caps, width=width, height=height, steps=steps)


def check_edit_inputs(
    tier_name: str, tier: Tier, *, images: int, largest_pixels: int | None = None
) -> None:
    """400 naming the upload when an edit's inputs exceed the tier's caps: how many
    images, and (once their headers are read) the largest one's pixel count."""
    caps = tier.caps
    if caps.max_input_images is not None and images > caps.max_input_images:
        raise InvalidRequest(
            f"the {tier_name} tier edits at most {caps.max_input_images} uploaded image(s) "
            f"per request, got {images}",
            param="image",
        )
    if (
        caps.max_input_pixels is not None
        and largest_pixels is not None
        and largest_pixels > caps.max_input_pixels
    ):
        raise InvalidRequest(
            f"the {tier_name} tier edits images of at most {caps.max_input_pixels} pixels "
            f"(width x height), got {largest_pixels}; scale the image down",
            param="image",
        )


def check_video_request(
    tier_name: str,
    tier: Tier,
    *,
    account_age_s: float,
    seconds: int,
    width: int,
    height: int,
    steps: int,
) -> None:
    """403 when video is closed to the tier or the account is too young; 400 over the caps."""
    if not tier.video.enabled:
        raise Forbidden(
            f"video generation is not available on the {tier_name} tier",
            code="tier_not_allowed",
        )
    min_age_days = tier.video.min_account_age_days
    if account_age_s < min_age_days * 86400:
        raise Forbidden(
            f"video generation on the {tier_name} tier needs an account at least "
            f"{min_age_days:g} days old; this one is {account_age_s / 86400:.1f} days old",
            code="account_too_new",
        )
    if tier.caps.max_seconds is not None and seconds > tier.caps.max_seconds:
        raise InvalidRequest(
            f"the {tier_name} tier makes videos of at most {tier.caps.max_seconds} seconds, "
            f"got {seconds}",
            param="seconds",
        )
    _check_common(tier_name, tier.caps, width=width, height=height, steps=steps)


def _check_common(tier_name: str, caps: TierCaps, *, width: int, height: int, steps: int) -> None:
    if caps.max_side is not None and max(width, height) > caps.max_side:
        raise InvalidRequest(
            f"the {tier_name} tier allows sides up to {caps.max_side} pixels, got {width}x{height}",
            param="size",
        )
    if caps.max_steps is not None and steps > caps.max_steps:
        raise InvalidRequest(
            f"the {tier_name} tier allows at most {caps.max_steps} denoising steps, got {steps}",
            param="num_inference_steps",
        )
