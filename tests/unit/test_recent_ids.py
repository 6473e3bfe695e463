"""``RecentIds``: what the image scheduler remembers of started and withdrawn requests."""

from __future__ import annotations

from deployments.scheduler.in_flight import RecentIds


def test_an_id_is_seen_for_keep_s_even_without_later_adds() -> None:
    recent = RecentIds(keep_s=10.0)
    recent.add("a", now=100.0)
    assert recent.seen("a", now=110.0)
    assert not recent.seen("a", now=110.5)  # past its age, though nothing was added since
    assert not recent.seen("b", now=100.0)


def test_adds_drop_the_oldest_past_their_age_or_beyond_the_limit() -> None:
    recent = RecentIds(keep_s=10.0, limit=2)
    recent.add("a", now=0.0)
    recent.add("b", now=1.0)
    recent.add("c", now=2.0)  # over the limit: "a" goes
    assert [recent.seen(key, now=2.0) for key in "abc"] == [False, True, True]
    recent.add("d", now=11.5)  # "b" is past its age
    assert [recent.seen(key, now=11.5) for key in "bcd"] == [False, True, True]
    recent.add("c", now=11.6)  # a repeat keeps its first time
    assert not recent.seen("c", now=12.5)
