"""The quota rules as pure functions, against reference models, with a fake clock."""

from __future__ import annotations

import math
import random
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediagate.access.quota import (
    LedgerState,
    finish,
    quota_day,
    reserve,
    seconds_to_next_day,
    usage,
)
from mediagate.access.tiers import CooldownRule, Tier, load_tier_policy
from mediagate.protocol.errors import QuotaExceeded, RateLimited

UTC = ZoneInfo("UTC")
T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def admit(
    state: LedgerState, tier: Tier, now: float, units: int = 1, rid: str = "r"
) -> LedgerState:
    return reserve(state, tier, kind="image", units=units, rid=rid, now=now, zone=UTC)


def test_shipped_policy_matches_the_design_table() -> None:
    policy = load_tier_policy()
    free, plus, pro = (policy.tiers[name] for name in ("free", "plus", "pro"))
    assert (free.images_per_day, free.video.enabled, free.video_jobs_at_once) == (3, False, 0)
    assert plus.cooldown == CooldownRule(after_images=20, window_min=10, wait_min=5)
    assert (plus.images_per_day, plus.images_per_minute, plus.video_jobs_at_once) == (200, 10, 1)
    assert plus.video.min_account_age_days == 7
    assert (pro.images_per_day, pro.images_per_minute, pro.video_jobs_at_once) == (None, 60, 4)
    assert free.priority_class < plus.priority_class < pro.priority_class
    assert (free.max_queue_wait_s, plus.max_queue_wait_s, pro.max_queue_wait_s) == (30, 120, 600)


def test_daily_quota_resets_at_midnight_in_the_policy_zone() -> None:
    tier = Tier(images_per_day=3)
    state = LedgerState()
    for index in range(3):
        state = admit(state, tier, T0 + index, rid=f"r{index}")
    with pytest.raises(QuotaExceeded) as refused:
        admit(state, tier, T0 + 10)
    assert refused.value.retry_after_s == pytest.approx(16 * 3600 - 10, abs=1)
    assert refused.value.code == "insufficient_quota"
    after_midnight = T0 + seconds_to_next_day(T0, UTC) + 1
    admit(state, tier, after_midnight)  # a new day
    tokyo = ZoneInfo("Asia/Tokyo")
    assert quota_day(T0, tokyo) == "2027-01-15" and quota_day(T0 + 8 * 3600, tokyo) == "2027-01-16"


@pytest.mark.parametrize("zone_name", ["Europe/Berlin", "America/Santiago", "Asia/Tokyo"])
def test_the_remembered_day_is_the_zone_calendar_day_across_daylight_saving(
    zone_name: str,
) -> None:
    """``quota_day`` keeps the last day it looked up; asked in any order, across DST
    changes (Santiago's happen at midnight, so some days start at 01:00), it answers
    as a fresh conversion would."""
    zone = ZoneInfo(zone_name)
    start = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    times = [start + minute * 60.0 + 0.5 for minute in range(0, 366 * 1440, 37)]
    random.Random(3).shuffle(times[: len(times) // 2])  # half in order, half shuffled
    for now in times:
        local = datetime.fromtimestamp(now, zone)
        assert quota_day(now, zone) == local.date().isoformat()
        next_midnight = datetime.combine(local.date() + timedelta(days=1), time.min, zone)
        assert seconds_to_next_day(now, zone) == max(1.0, next_midnight.timestamp() - now)


def test_n_images_count_as_n() -> None:
    tier = Tier(images_per_day=3)
    state = admit(LedgerState(), tier, T0, units=2)
    with pytest.raises(QuotaExceeded):
        admit(state, tier, T0, units=2, rid="r2")
    assert admit(state, tier, T0, units=1, rid="r3").day_images == 3


def test_release_gives_back_everything_commit_keeps_it_and_both_happen_once() -> None:
    tier = Tier(images_per_day=3, cooldown=CooldownRule(after_images=2, window_min=10, wait_min=5))
    state = admit(LedgerState(), tier, T0, rid="a")
    state = admit(state, tier, T0 + 1, rid="b")  # the burst is full: cooldown
    with pytest.raises(RateLimited):
        admit(state, tier, T0 + 2, rid="c")
    released, held = finish(state, "b", commit=False)
    assert held and released.day_images == 1 and released.cooldown_until == 0
    again, held_again = finish(released, "b", commit=False)
    assert not held_again and again == released  # exactly once
    state = admit(released, tier, T0 + 3, rid="c")  # the cooldown went with "b"
    committed, held = finish(state, "a", commit=True)
    assert held and committed.day_images == 2


def test_video_jobs_at_once() -> None:
    tier = Tier(video_jobs_at_once=1)
    state = reserve(LedgerState(), tier, kind="video", units=1, rid="v1", now=T0, zone=UTC)
    with pytest.raises(RateLimited) as refused:
        reserve(state, tier, kind="video", units=1, rid="v2", now=T0, zone=UTC)
    assert refused.value.code == "concurrent_jobs_exceeded"
    state, _ = finish(state, "v1", commit=True)
    reserve(state, tier, kind="video", units=1, rid="v2", now=T0, zone=UTC)


def test_abandoned_image_reservations_count_as_delivered() -> None:
    tier = Tier(images_per_day=1)
    state = admit(LedgerState(), tier, T0)
    with pytest.raises(QuotaExceeded):
        admit(state, tier, T0 + 3600, rid="x")  # expired reservation: still charged
    assert usage(state, tier, now=T0 + 3600, zone=UTC).images_today == 1


# Property tests: the rules against reference models written from the definitions.

requests = st.lists(
    st.tuples(st.floats(min_value=0, max_value=90, allow_nan=False), st.integers(1, 3)),
    min_size=1,
    max_size=60,
)


def counted_until(at: float, window_s: float) -> float:
    """An image admitted at ``at`` counts until the end of its bucket (1/60 of the window)
    leaves the window: at least ``window_s``, at most one bucket more."""
    width = window_s / 60
    return math.ceil(at / width) * width + window_s


def reference_per_minute(
    history: list[tuple[float, int]], now: float, units: int, limit: int
) -> bool:
    """Admit iff the images still counted at ``now`` plus these stay within the limit."""
    return sum(u for t, u in history if t <= now < counted_until(t, 60)) + units <= limit


@settings(max_examples=300, deadline=None)
@given(requests, st.integers(1, 6))
def test_per_minute_rule_matches_its_reference(steps: list[tuple[float, int]], limit: int) -> None:
    tier = Tier(images_per_minute=limit)
    state, now = LedgerState(), T0
    history: list[tuple[float, int]] = []
    for index, (gap, units) in enumerate(steps):
        now += gap
        expected = reference_per_minute(history, now, units, limit)
        try:
            state = admit(state, tier, now, units, rid=f"r{index}")
        except RateLimited as refused:
            assert not expected
            assert refused.retry_after_s is not None and refused.retry_after_s > 0
            if units <= limit:  # waiting as told is enough
                later = now + refused.retry_after_s
                assert reference_per_minute(history, later, units, limit)
                admit(state, tier, later, units, rid="probe")
        else:
            assert expected
            history.append((now, units))
    for t, _ in history:  # no 60 s window ever holds more than the limit
        assert sum(u for s, u in history if t - 60 < s <= t) <= limit


def reference_cooldown(
    history: list[tuple[float, int]],
    triggers: list[float],
    now: float,
    units: int,
    rule: CooldownRule,
) -> bool:
    """Burst then wait: no admission within wait_min of a trigger; a burst counts the images
    since the last trigger still counted in the window; admit iff the burst stays within
    after_images."""
    wait_s, window_s = rule.wait_min * 60, rule.window_min * 60
    if any(s <= now < s + wait_s for s in triggers):
        return False
    since = max(triggers, default=-1.0)
    burst = sum(u for t, u in history if t > since and now < counted_until(t, window_s))
    return burst + units <= rule.after_images


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=400, allow_nan=False), st.integers(1, 3)),
        min_size=1,
        max_size=60,
    ),
    st.integers(2, 6),
)
def test_cooldown_rule_matches_its_reference(steps: list[tuple[float, int]], burst: int) -> None:
    rule = CooldownRule(after_images=burst, window_min=10, wait_min=5)
    tier = Tier(cooldown=rule)
    state, now = LedgerState(), T0
    history: list[tuple[float, int]] = []
    triggers: list[float] = []
    for index, (gap, units) in enumerate(steps):
        now += gap
        expected = reference_cooldown(history, triggers, now, units, rule)
        try:
            state = admit(state, tier, now, units, rid=f"r{index}")
        except RateLimited as refused:
            assert not expected, (history, triggers, now, units)
            assert refused.retry_after_s is not None and refused.retry_after_s > 0
            if units <= rule.after_images:
                later = now + refused.retry_after_s
                assert reference_cooldown(history, triggers, later, units, rule)
                admit(state, tier, later, units, rid="probe")
        else:
            assert expected, (history, triggers, now, units)
            history.append((now, units))
            since = max(triggers, default=-1.0)
            burst = sum(u for t, u in history if t > since and now < counted_until(t, 600))
            if burst >= rule.after_images:
                triggers.append(now)
    # Between two triggers at most after_images images; none within wait_min after one.
    for start in triggers:
        assert not any(start < t < start + 300 for t, _ in history)


def test_the_ledger_stays_the_same_size_however_busy_the_account() -> None:
    """1000 images in a minute leave at most a bucket per second of the window (and one
    for the burst's), not an event per request; a limit the tier lacks records nothing."""
    busy = Tier(
        images_per_minute=5000, cooldown=CooldownRule(after_images=10**6, window_min=10, wait_min=1)
    )
    state, sizes = LedgerState(), []
    for index in range(1000):
        state = admit(state, busy, T0 + index * 0.05, rid=f"r{index}")
        state, _ = finish(state, f"r{index}", commit=True)
        sizes.append(len(state.model_dump_json()))
    assert len(state.minute) <= 61 and len(state.burst) <= 61 and not state.reservations
    assert sum(state.minute.values()) == 1000 == state.day_images
    assert max(sizes) < 2_000  # a JSON document of a few buckets, not of 1000 events

    unlimited = Tier()
    state = LedgerState()
    for index in range(100):
        state = admit(state, unlimited, T0 + index, rid=f"u{index}")
    assert state.minute == {} and state.burst == {} and state.day_images == 100
