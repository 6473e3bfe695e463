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
- images per minute: images admitted in the last 60 s (sliding, counted per second).
- cooldown: once ``after_images`` images have been admitted within
  ``window_min`` minutes, nothing more for ``wait_min`` minutes; the burst then
  starts afresh. A burst that would overshoot is refused until enough ages out.

The state is O(1) in an account's activity: a day counter, and for the sliding
windows a count per time bucket (60 buckets a window: 1 s for the minute, 10 s for
a 10-minute burst), kept only when the tier has that limit. An image counts in its
bucket until the bucket's end leaves the window, so a window may hold an image up to
one bucket longer than it was asked to, never shorter: no 60 s ever holds more than
the limit.
- video jobs at once: video reservations not yet finished.
A released reservation gives back everything it took, including a cooldown it
triggered. Reservations the caller never finished expire: images count as
delivered after ``IMAGE_RESERVATION_TTL_S``; video slots free after
``VIDEO_RESERVATION_TTL_S``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field

from mediagate.access.tiers import Tier
from mediagate.protocol.errors import QuotaExceeded, RateLimited

Kind = Literal["image", "video"]
MINUTE_S = 60.0
BUCKETS_PER_WINDOW = 60
IMAGE_RESERVATION_TTL_S = 15 * 60.0
VIDEO_RESERVATION_TTL_S = 6 * 3600.0

Buckets = dict[int, int]  # bucket number (its end is number x width) -> images in it


class Reservation(BaseModel):
    """What a reservation took, so that a release gives back exactly that."""

    kind: Kind
    units: int
    at: float
    day: str
    minute_bucket: int | None = None  # where it was counted (None: not counted there)
    burst_bucket: int | None = None

    @property
    def lapses_at(self) -> float:
        """When an unfinished reservation is given up on (``IMAGE/VIDEO_RESERVATION_TTL_S``)."""
        ttl_s = IMAGE_RESERVATION_TTL_S if self.kind == "image" else VIDEO_RESERVATION_TTL_S
        return self.at + ttl_s


class LedgerState(BaseModel):
    """One account's quota ledger; serialised as JSON by the stores. Its size is bounded
    by the buckets of its windows and the reservations in flight, not by how many
    requests the account made."""

    day: str = ""
    day_images: int = 0
    minute: Buckets = Field(default_factory=dict)
    burst: Buckets = Field(default_factory=dict)
    cooldown_until: float = 0.0
    cooldown_trigger: str | None = None
    cooldown_burst: Buckets = Field(default_factory=dict)
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


@dataclass(frozen=True)
class _DayWindow:
    """One quota day of one zone: ``[starts_at, ends_at)`` in epoch seconds."""

    day: str
    starts_at: float
    ends_at: float


# The last day looked up per zone: every request asks, and nearly all fall in the same
# day (a zone conversion costs more than the rest of a reservation's arithmetic).
_last_day_by_zone: dict[ZoneInfo, _DayWindow] = {}


def _day_window(now: float, zone: ZoneInfo) -> _DayWindow:
    window = _last_day_by_zone.get(zone)
    if window is not None and window.starts_at <= now < window.ends_at:
        return window
    date = datetime.fromtimestamp(now, zone).date()
    window = _DayWindow(
        date.isoformat(),
        datetime.combine(date, datetime.min.time(), zone).timestamp(),
        datetime.combine(date + timedelta(days=1), datetime.min.time(), zone).timestamp(),
    )
    if window.starts_at <= now < window.ends_at:  # (a zone whose midnight is skipped: not kept)
        _last_day_by_zone[zone] = window
    return window


def quota_day(now: float, zone: ZoneInfo) -> str:
    return _day_window(now, zone).day


def seconds_to_next_day(now: float, zone: ZoneInfo) -> float:
    return max(1.0, _day_window(now, zone).ends_at - now)


def bucket_width_s(window_s: float) -> float:
    return window_s / BUCKETS_PER_WINDOW


def bucket_of(at: float, window_s: float) -> int:
    """The bucket an image admitted at ``at`` counts in: the one ending at or after it."""
    return math.ceil(at / bucket_width_s(window_s))


def _bucket_leaves_s(bucket: int, window_s: float) -> float:
    """When a bucket's images leave the window."""
    return bucket * bucket_width_s(window_s) + window_s


def _live(buckets: Buckets, window_s: float, now: float) -> Buckets:
    return {b: n for b, n in buckets.items() if _bucket_leaves_s(b, window_s) > now}


def _wait_until_fits(
    buckets: Buckets, window_s: float, limit: int, units: int, now: float
) -> float:
    """Seconds until enough of ``buckets`` leave the window for ``units`` more to fit."""
    if units > limit:
        return math.inf
    remaining = sum(buckets.values())
    if remaining + units <= limit:
        return 0.0
    for bucket in sorted(buckets):
        remaining -= buckets[bucket]
        if remaining + units <= limit:
            return max(_bucket_leaves_s(bucket, window_s) - now, 0.001)
    return 0.0


def _expire(state: LedgerState, tier: Tier, now: float, day: str) -> LedgerState:
    """Day roll-over, aged-out buckets and abandoned reservations (a fresh copy: the
    caller's state is left as it was)."""
    state = state.model_copy(
        update={
            "minute": _live(state.minute, MINUTE_S, now) if tier.images_per_minute else {},
            "burst": (
                _live(state.burst, tier.cooldown.window_min * 60, now) if tier.cooldown else {}
            ),
            "cooldown_burst": dict(state.cooldown_burst),
            # images past their TTL stay counted as delivered; videos free their slot
            "reservations": {
                rid: held for rid, held in state.reservations.items() if held.lapses_at > now
            },
        }
    )
    if state.day != day:
        state.day, state.day_images = day, 0
    if state.cooldown_until <= now and state.cooldown_trigger is not None:
        state.cooldown_trigger, state.cooldown_burst = None, {}
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
        if sum(state.minute.values()) + units > limit:
            wait = _wait_until_fits(state.minute, MINUTE_S, limit, units, now)
            raise RateLimited(
                f"your tier makes at most {limit} images per minute",
                retry_after_s=wait if math.isfinite(wait) else MINUTE_S,
            )
    if tier.cooldown is not None:
        rule = tier.cooldown
        window_s = rule.window_min * 60
        if sum(state.burst.values()) + units > rule.after_images:
            wait = _wait_until_fits(state.burst, window_s, rule.after_images, units, now)
            raise RateLimited(
                f"this request would take you past {rule.after_images} images within "
                f"{rule.window_min:g} minutes",
                code="cooldown",
                retry_after_s=wait if math.isfinite(wait) else window_s,
            )

    held = Reservation(kind=kind, units=units, at=now, day=day)
    state.day_images += units
    if tier.images_per_minute is not None:
        held.minute_bucket = bucket_of(now, MINUTE_S)
        state.minute[held.minute_bucket] = state.minute.get(held.minute_bucket, 0) + units
    if tier.cooldown is not None:
        held.burst_bucket = bucket_of(now, tier.cooldown.window_min * 60)
        state.burst[held.burst_bucket] = state.burst.get(held.burst_bucket, 0) + units
        if sum(state.burst.values()) >= tier.cooldown.after_images:
            state.cooldown_until = now + tier.cooldown.wait_min * 60
            state.cooldown_trigger = rid
            state.cooldown_burst, state.burst = state.burst, {}
    state.reservations[rid] = held
    return state


def _take_back(buckets: Buckets, bucket: int | None, units: int) -> Buckets:
    if bucket is None or bucket not in buckets:
        return buckets
    left = {**buckets, bucket: buckets[bucket] - units}
    return {b: n for b, n in left.items() if n > 0}


def finish(state: LedgerState, rid: str, *, commit: bool) -> tuple[LedgerState, bool]:
    """Commit or release ``rid``; the flag says whether it was still held (exactly once)."""
    held = state.reservations.get(rid)
    if held is None:
        return state, False
    reservations = {key: value for key, value in state.reservations.items() if key != rid}
    if commit or held.kind == "video":
        return state.model_copy(update={"reservations": reservations}), True
    state = state.model_copy(
        update={
            "reservations": reservations,
            "minute": _take_back(state.minute, held.minute_bucket, held.units),
            "burst": _take_back(state.burst, held.burst_bucket, held.units),
        }
    )
    if held.day == state.day:
        state.day_images = max(0, state.day_images - held.units)
    if state.cooldown_trigger == rid:  # give back the cooldown it started
        state.burst = _take_back(state.cooldown_burst, held.burst_bucket, held.units)
        state.cooldown_until, state.cooldown_trigger, state.cooldown_burst = 0.0, None, {}
    return state, True


def usage(state: LedgerState, tier: Tier, *, now: float, zone: ZoneInfo) -> Usage:
    day = quota_day(now, zone)
    state = _expire(state, tier, now, day)
    minute_resets_in_s = (
        max(0.0, _bucket_leaves_s(min(state.minute), MINUTE_S) - now) if state.minute else 0.0
    )
    return Usage(
        day=day,
        images_today=state.day_images,
        images_per_day=tier.images_per_day,
        day_resets_in_s=seconds_to_next_day(now, zone),
        images_last_minute=sum(state.minute.values()),
        images_per_minute=tier.images_per_minute,
        minute_resets_in_s=minute_resets_in_s,
        cooldown_left_s=max(0.0, state.cooldown_until - now),
        burst_images=sum(state.burst.values()),
        video_jobs_active=sum(1 for r in state.reservations.values() if r.kind == "video"),
        video_jobs_at_once=tier.video_jobs_at_once,
    )
