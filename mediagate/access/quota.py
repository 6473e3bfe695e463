"""Quota rules as pure functions over one account's ledger state.

``reserve`` decides whether a request may start and returns the new state;
``finish`` commits or releases a reservation exactly once; ``usage`` reports
what is left. They take the time as an argument and do no I/O: the stores run
them inside one atomic read-modify-write per account (SQLite ``BEGIN
IMMEDIATE``, Redis WATCH/MULTI), so limits stay exact however many requests
arrive at once, and tests drive them with a fake clock.

Rules (``None`` in the tier means no limit):
- images per day: images reserved or committed in the current quota day (a
  calendar day in the policy's time zone); refused with ``QuotaExceeded``, to
  retry after the day resets.
- images per minute: images admitted in the last 60 s (sliding).
- cooldown: once ``after_images`` images have been admitted within
  ``window_min`` minutes, nothing more for ``wait_min`` minutes; the burst then
  starts afresh. A burst that would overshoot is refused until enough ages out.
- video jobs at once: video reservations not yet finished.
A released reservation gives back everything it took, including a cooldown it
triggered. Reservations the caller never finished expire: images count as
delivered after ``IMAGE_RESERVATION_TTL_S``; video slots free after
``VIDEO_RESERVATION_TTL_S``.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field

from mediagate.access.tiers import Tier
from mediagate.protocol.errors import QuotaExceeded, RateLimited

Kind = Literal["image", "video"]
MINUTE_S = 60.0
IMAGE_RESERVATION_TTL_S = 15 * 60.0
VIDEO_RESERVATION_TTL_S = 6 * 3600.0


class Event(BaseModel):
    """Images admitted at ``at`` by reservation ``rid``."""

    at: float
    units: int
    rid: str


class Reservation(BaseModel):
    kind: Kind
    units: int
    at: float
    day: str


class LedgerState(BaseModel):
    """One account's quota ledger; serialised as JSON by the stores."""

    day: str = ""
    day_images: int = 0
    minute: list[Event] = Field(default_factory=list)
    burst: list[Event] = Field(default_factory=list)
    cooldown_until: float = 0.0
    cooldown_trigger: str | None = None
    cooldown_burst: list[Event] = Field(default_factory=list)
    reservations: dict[str, Reservation] = Field(default_factory=dict)


class Usage(BaseModel):
    """What an account has used and has left, for headers and ``mediagate usage``."""

    day: str
    images_today: int
    images_per_day: int | None
    day_resets_in_s: float
    images_last_minute: int
    images_per_minute: int | None
    minute_resets_in_s: float
    cooldown_left_s: float
    burst_images: int
    video_jobs_active: int
    video_jobs_at_once: int


def quota_day(now: float, zone: ZoneInfo) -> str:
    return datetime.fromtimestamp(now, zone).date().isoformat()


def seconds_to_next_day(now: float, zone: ZoneInfo) -> float:
    local = datetime.fromtimestamp(now, zone)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), zone)
    return max(1.0, midnight.timestamp() - now)


def _wait_until_fits(
    events: list[Event], window_s: float, limit: int, units: int, now: float
) -> float:
    """Seconds until enough of ``events`` leave the window for ``units`` more to fit."""
    if units > limit:
        return math.inf
    remaining = sum(event.units for event in events)
    if remaining + units <= limit:
        return 0.0
    for event in sorted(events, key=lambda e: e.at):
        remaining -= event.units
        if remaining + units <= limit:
            return max(event.at + window_s - now, 0.001)
    return 0.0


def _expire(state: LedgerState, tier: Tier, now: float, day: str) -> LedgerState:
    """Day roll-over, aged-out events and abandoned reservations."""
    state = state.model_copy(deep=True)
    if state.day != day:
        state.day, state.day_images = day, 0
    state.minute = [e for e in state.minute if e.at > now - MINUTE_S]
    if tier.cooldown is not None:
        window_s = tier.cooldown.window_min * 60
        state.burst = [e for e in state.burst if e.at > now - window_s]
    if state.cooldown_until <= now and state.cooldown_trigger is not None:
        state.cooldown_trigger, state.cooldown_burst = None, []
    for rid, held in list(state.reservations.items()):
        ttl = IMAGE_RESERVATION_TTL_S if held.kind == "image" else VIDEO_RESERVATION_TTL_S
        if held.at + ttl <= now:
            del state.reservations[rid]  # images: kept as delivered; videos: slot freed
    return state


def reserve(
    state: LedgerState, tier: Tier, *, kind: Kind, units: int, rid: str, now: float, zone: ZoneInfo
) -> LedgerState:
    """The state after admitting the request, or ``QuotaExceeded`` / ``RateLimited``."""
    day = quota_day(now, zone)
    state = _expire(state, tier, now, day)
    if kind == "video":
        active = sum(1 for held in state.reservations.values() if held.kind == "video")
        if active + units > tier.video_jobs_at_once:
            raise RateLimited(
                f"your tier runs at most {tier.video_jobs_at_once} video job(s) at once; "
                "wait for one to finish",
                code="concurrent_jobs_exceeded",
                retry_after_s=10,
            )
        state.reservations[rid] = Reservation(kind=kind, units=units, at=now, day=day)
        return state

    if tier.images_per_day is not None and state.day_images + units > tier.images_per_day:
        raise QuotaExceeded(
            f"you have used {state.day_images} of your {tier.images_per_day} images for today; "
            "the quota resets at midnight "
            f"({zone.key})",
            retry_after_s=math.ceil(seconds_to_next_day(now, zone)),
        )
    if tier.cooldown is not None and state.cooldown_until > now:
        raise RateLimited(
            f"you made {tier.cooldown.after_images} images within {tier.cooldown.window_min:g} "
            f"minutes; please wait {tier.cooldown.wait_min:g} minutes",
            code="cooldown",
            retry_after_s=state.cooldown_until - now,
        )
    if tier.images_per_minute is not None:
        limit = tier.images_per_minute
        if sum(e.units for e in state.minute) + units > limit:
            wait = _wait_until_fits(state.minute, MINUTE_S, limit, units, now)
            raise RateLimited(
                f"your tier makes at most {limit} images per minute",
                retry_after_s=wait if math.isfinite(wait) else MINUTE_S,
            )
    if tier.cooldown is not None:
        rule = tier.cooldown
        if sum(e.units for e in state.burst) + units > rule.after_images:
            window_s = rule.window_min * 60
            wait = _wait_until_fits(state.burst, window_s, rule.after_images, units, now)
            raise RateLimited(
                f"this request would take you past {rule.after_images} images within "
                f"{rule.window_min:g} minutes",
                code="cooldown",
                retry_after_s=wait if math.isfinite(wait) else window_s,
            )

    event = Event(at=now, units=units, rid=rid)
    state.day_images += units
    state.minute.append(event)
    state.reservations[rid] = Reservation(kind=kind, units=units, at=now, day=day)
    if tier.cooldown is not None:
        state.burst.append(event)
        if sum(e.units for e in state.burst) >= tier.cooldown.after_images:
            state.cooldown_until = now + tier.cooldown.wait_min * 60
            state.cooldown_trigger = rid
            state.cooldown_burst = state.burst
            state.burst = []
    return state


def finish(state: LedgerState, rid: str, *, commit: bool) -> tuple[LedgerState, bool]:
    """Commit or release ``rid``; the flag says whether it was still held (exactly once)."""
    held = state.reservations.get(rid)
    if held is None:
        return state, False
    state = state.model_copy(deep=True)
    del state.reservations[rid]
    if commit or held.kind == "video":
        return state, True
    if held.day == state.day:
        state.day_images = max(0, state.day_images - held.units)
    state.minute = [e for e in state.minute if e.rid != rid]
    state.burst = [e for e in state.burst if e.rid != rid]
    if state.cooldown_trigger == rid:  # give back the cooldown it started
        state.burst = [e for e in state.cooldown_burst if e.rid != rid]
        state.cooldown_until, state.cooldown_trigger, state.cooldown_burst = 0.0, None, []
    return state, True


def usage(state: LedgerState, tier: Tier, *, now: float, zone: ZoneInfo) -> Usage:
    day = quota_day(now, zone)
    state = _expire(state, tier, now, day)
    oldest = min((e.at for e in state.minute), default=now)
    return Usage(
        day=day,
        images_today=state.day_images,
        images_per_day=tier.images_per_day,
        day_resets_in_s=seconds_to_next_day(now, zone),
        images_last_minute=sum(e.units for e in state.minute),
        images_per_minute=tier.images_per_minute,
        minute_resets_in_s=max(0.0, oldest + MINUTE_S - now) if state.minute else 0.0,
        cooldown_left_s=max(0.0, state.cooldown_until - now),
        burst_images=sum(e.units for e in state.burst),
        video_jobs_active=sum(1 for r in state.reservations.values() if r.kind == "video"),
        video_jobs_at_once=tier.video_jobs_at_once,
    )
