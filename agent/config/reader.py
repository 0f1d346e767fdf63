"""The [windows] section: when the uplink may send (intervals, daily, cycle, and the sources).

The site-config assembler (`agent.daemon.site_config`) calls `_windows`; the other sections have
their own modules (site, intake, uplink, telemetry, mqtt, and backends/config for [backend]).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, time
from pathlib import Path
from typing import cast

from agent.config.settings import (
    CycleWindow,
    DailyWindow,
    Interval,
    WindowMode,
    WindowSettings,
)
from agent.config.table import MISSING, Table
from agent.windows import configure as window_config


def _windows(t: Table, base: Path) -> WindowSettings:
    mode = t.choice("mode", ("always", "schedule"), "always")
    interval_how = "write intervals = [ { start = 2026-11-25T10:00:00Z, end = ..., rate = ... } ]"
    intervals = [
        i
        for item in t.tables("intervals", ("start", "end", "rate"), interval_how)
        if (i := _interval(item)) is not None
    ]
    daily_how = 'write daily = [ { start = "22:00", end = "04:00", rate = "5Mbit/s" } ]'
    daily = [
        d
        for item in t.tables("daily", ("start", "end", "rate"), daily_how)
        if (d := _daily(item)) is not None
    ]
    cycle = _cycle(t.table("cycle", ("open", "closed"))) if t.has("cycle") else None
    extras = window_config.read_extras(t, base)  # timetable, tle, link, pass margins
    has_windows = any(t.raw(k) not in (MISSING, [])
                      for k in ("intervals", "daily", "cycle", *window_config.SOURCE_KEYS))
    if mode == "schedule" and not has_windows:
        t.report(
            "mode",
            'is "schedule" but no window is configured',
            "add intervals, daily, cycle, timetable, timetable_file or [windows.tle]",
        )
    if mode == "always" and has_windows:
        t.report(
            "mode",
            'is "always" (the default), so intervals, daily, cycle, timetable and tle would '
            "be ignored",
            'set mode = "schedule" to use them, or remove them',
        )
    return WindowSettings(
        mode=cast(WindowMode, mode),
        intervals=tuple(sorted(intervals, key=lambda i: i.start)),
        daily=tuple(daily),
        cycle=cycle,
        **extras,
    )


def _interval(t: Table) -> Interval | None:
    start = _instant(t, "start")
    end = _instant(t, "end")
    rate = t.rate("rate", None)
    t.positive("rate", rate, 'give a rate such as "10Mbit/s", or remove rate')
    if start is None or end is None:
        return None
    if end <= start:
        t.report("end", f"is not after start ({start.isoformat()})", "make end later than start")
        return None
    return Interval(start=start, end=end, rate_bps=rate)


def _instant(t: Table, name: str) -> datetime | None:
    """A TOML offset date-time or an RFC 3339 string, converted to aware UTC."""
    example = "e.g. 2026-11-25T10:00:00Z"
    if not t.require(name, f"{name} = 2026-11-25T10:00:00Z"):
        return None
    value = t.raw(name)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            t.report(name, "is not an RFC 3339 date-time", example)
            return None
    if not isinstance(value, datetime):
        t.report(name, "must be a date and time", f"with a UTC offset, {example}")
        return None
    if value.utcoffset() is None:
        t.report(name, "has no UTC offset", f"add Z (UTC) or +HH:MM, {example}")
        return None
    return value.astimezone(UTC)


def _daily(t: Table) -> DailyWindow | None:
    start = _time_of_day(t, "start")
    end = _time_of_day(t, "end")
    rate = t.rate("rate", None)
    t.positive("rate", rate, 'give a rate such as "5Mbit/s", or remove rate')
    if start is None or end is None:
        return None
    if start == end:
        t.report(
            "end",
            "equals start, so the window is empty",
            'use a different end (an end before start crosses midnight), or mode = "always"',
        )
        return None
    return DailyWindow(start_s=start, end_s=end, rate_bps=rate)


_TIME_RE = re.compile(r"([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?")


def _time_of_day(t: Table, name: str) -> int | None:
    """Seconds after 00:00 UTC from "HH:MM", "HH:MM:SS" or a TOML local time."""
    if not t.require(name, f'{name} = "22:00"'):
        return None
    value = t.raw(name)
    if isinstance(value, time):
        return value.hour * 3600 + value.minute * 60 + value.second
    match = _TIME_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        t.report(name, "is not a time of day", 'write "HH:MM" or "HH:MM:SS" in UTC, e.g. "22:00"')
        return None
    return int(match[1]) * 3600 + int(match[2]) * 60 + int(match[3] or 0)


def _cycle(t: Table) -> CycleWindow | None:
    t.require("open", 'open = "15s"')
    t.require("closed", 'closed = "10s"')
    open_s = t.duration("open", None)
    closed_s = t.duration("closed", None)
    t.positive("open", open_s, 'give a duration such as "15s"')
    t.positive("closed", closed_s, 'give a duration such as "10s"')
    if open_s is None or closed_s is None:
        return None
    return CycleWindow(open_s=open_s, closed_s=closed_s)
