"""agent.windows.schedule: explicit, daily and cycle windows, merging, next_change."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from agent.config.settings import CycleWindow, DailyWindow, Interval, WindowSettings
from agent.windows import Contact
from agent.windows.schedule import Schedule, merge

H = 3600.0
DAY = 86400.0
DAY0 = datetime(2025, 3, 10, tzinfo=UTC).timestamp()  # a midnight UTC


def at(hour: float, day: int = 0) -> float:
    return DAY0 + day * DAY + hour * H


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def schedule(*, intervals: tuple[Interval, ...] = (), daily: tuple[DailyWindow, ...] = (),
             cycle: CycleWindow | None = None, anchor: float = 0.0) -> Schedule:
    return Schedule(WindowSettings(mode="schedule", intervals=intervals, daily=daily,
                                   cycle=cycle), anchor)


def test_explicit_interval_boundaries() -> None:
    s = schedule(intervals=(Interval(utc(at(10)), utc(at(11)), 2_000_000.0),))
    assert not s.always
    assert s.window_at(at(10)) == Contact(at(10), at(11), 2_000_000.0, "interval")
    assert s.window_at(at(11) - 0.001) is not None
    assert s.window_at(at(10) - 0.001) is None  # start inclusive ...
    assert s.window_at(at(11)) is None  # ... end exclusive
    assert s.next_change(at(9)) == at(10)
    assert s.next_change(at(10)) == at(11)
    assert s.next_change(at(10.5)) == at(11)
    assert s.next_change(at(11)) is None  # nothing else within the horizon
    assert s.contacts(at(0), at(24)) == [Contact(at(10), at(11), 2_000_000.0, "interval")]
    assert s.contacts(at(11), at(24)) == []


def test_several_intervals_in_time_order() -> None:
    s = schedule(intervals=(Interval(utc(at(14)), utc(at(15))),
                            Interval(utc(at(8)), utc(at(9)))))
    assert [c.start for c in s.contacts(at(0), at(24))] == [at(8), at(14)]
    assert s.next_change(at(9)) == at(14)
    assert s.window_at(at(14.5)) == Contact(at(14), at(15), None, "interval")


def test_daily_window_repeats_every_day() -> None:
    s = schedule(daily=(DailyWindow(9 * 3600, 10 * 3600, 500.0),))
    for day in (0, 1, 5):
        assert s.window_at(at(9, day)) == Contact(at(9, day), at(10, day), 500.0, "daily")
        assert s.window_at(at(10, day)) is None
        assert s.window_at(at(8.99, day)) is None
    assert s.next_change(at(10)) == at(9, 1)
    assert s.next_change(at(9.5)) == at(10)
    assert [c.start for c in s.contacts(at(0), at(0, 3))] == [at(9, d) for d in range(3)]


def test_daily_window_crossing_midnight() -> None:
    s = schedule(daily=(DailyWindow(23 * 3600, 1 * 3600, None),))
    late = s.window_at(at(23.5))
    early = s.window_at(at(0.5, 1))
    assert late == early == Contact(at(23), at(1, 1), None, "daily")
    assert late is not None and late.duration_s == 2 * H
    # Shortly after midnight of the first day: the window that began the evening before.
    assert s.window_at(at(0.25)) == Contact(at(-1), at(1), None, "daily")
    assert s.window_at(at(23)) is not None
    assert s.window_at(at(1)) is None
    assert s.window_at(at(12)) is None
    assert s.next_change(at(12)) == at(23)
    assert s.next_change(at(0.5, 1)) == at(1, 1)
    assert s.next_change(at(1)) == at(23)


def test_cycle_follows_its_anchor() -> None:
    anchor = 1_000_000.5
    s = schedule(cycle=CycleWindow(open_s=10, closed_s=20), anchor=anchor)
    assert s.window_at(anchor) == Contact(anchor, anchor + 10, None, "cycle")
    assert s.window_at(anchor + 9.999) is not None
    assert s.window_at(anchor + 10) is None
    assert s.window_at(anchor + 29.999) is None
    assert s.window_at(anchor + 30) == Contact(anchor + 30, anchor + 40, None, "cycle")
    assert s.window_at(anchor + 300 * 30 + 5) is not None  # far later, still in phase
    assert s.window_at(anchor - 25) == Contact(anchor - 30, anchor - 20, None, "cycle")
    assert s.window_at(anchor - 1) is None
    assert s.next_change(anchor + 5) == anchor + 10
    assert s.next_change(anchor + 15) == anchor + 30
    # The same settings with another anchor shift every window.
    other = schedule(cycle=CycleWindow(open_s=10, closed_s=20), anchor=anchor + 15)
    assert other.window_at(anchor) is None
    assert other.window_at(anchor + 15) is not None


def test_overlapping_windows_merge_and_keep_the_lower_rate() -> None:
    s = schedule(intervals=(Interval(utc(at(10)), utc(at(11)), 1000.0),
                            Interval(utc(at(10.5)), utc(at(12)), 400.0),
                            Interval(utc(at(12)), utc(at(13)), None)))  # touches: joins too
    merged = Contact(at(10), at(13), 400.0, "interval")
    assert s.contacts(at(0), at(24)) == [merged]
    assert s.window_at(at(10.25)) == merged
    assert s.window_at(at(12.5)) == merged
    # The gate must see one window: no change at the first interval's end.
    assert s.next_change(at(10.2)) == at(13)


def test_daily_and_interval_overlap_merges_across_sources() -> None:
    s = schedule(intervals=(Interval(utc(at(8)), utc(at(9.5)), 300.0),),
                 daily=(DailyWindow(9 * 3600, 10 * 3600, 800.0),))
    assert s.window_at(at(9.25)) == Contact(at(8), at(10), 300.0, "merged")
    assert s.window_at(at(9, 1)) == Contact(at(9, 1), at(10, 1), 800.0, "daily")


def test_merge_function() -> None:
    a = Contact(0, 10, None, "a")
    b = Contact(5, 20, 300.0, "b")
    c = Contact(30, 40, None, "a")
    d = Contact(32, 35, 100.0, "a")  # inside c
    assert merge([c, b, d, a]) == [Contact(0, 20, 300.0, "merged"), Contact(30, 40, 100.0, "a")]
    assert merge([]) == []
    assert merge([Contact(0, 10, 5.0, "x"), Contact(10, 11, 7.0, "x")]) == [
        Contact(0, 11, 5.0, "x")]
    assert merge([Contact(0, 10, None, "x"), Contact(10.5, 11, None, "x")]) == [
        Contact(0, 10, None, "x"), Contact(10.5, 11, None, "x")]


def test_always_mode() -> None:
    s = Schedule(WindowSettings(mode="always"), anchor=0.0)
    assert s.always
    for t in (0.0, at(3), at(23.99, 400)):
        w = s.window_at(t)
        assert w is not None and w.source == "always" and w.rate_bps is None
        assert w.start <= t and math.isinf(w.end)
        assert s.next_change(t) is None


def test_no_windows_configured() -> None:
    s = schedule()
    assert s.window_at(at(12)) is None
    assert s.next_change(at(12)) is None
    assert s.contacts(at(0), at(0, 30)) == []


@pytest.mark.parametrize("horizon_days", [1, 3])
def test_next_change_respects_horizon(horizon_days: int) -> None:
    s = schedule(intervals=(Interval(utc(at(12, 2)), utc(at(13, 2))),))
    expected = at(12, 2) if horizon_days == 3 else None
    assert s.next_change(at(12), horizon_s=horizon_days * DAY) == expected
