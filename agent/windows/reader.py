"""The [windows] table: mode, intervals, daily windows, cycle, the window sources, link and margins.

`read_windows` is what the config assembler calls; each window source reads its own keys (see
agent/windows/sources.py). Problems read like the rest of the config:
`<key.path>: <what is wrong> (got <value>); <how to fix>`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any, cast

from agent.config.settings import (
    CycleWindow,
    DailyWindow,
    Interval,
    LinkSettings,
    WindowMode,
    WindowSettings,
)
from agent.config.table import MISSING, Table
from agent.windows.linkmonitor import parse_probe
from agent.windows.sources import SOURCE_KEYS, SOURCES

LINK_KEYS = ("probe", "probe_interval", "probe_timeout", "down_after", "up_after", "learn")
KEYS = ("mode", "intervals", "daily", "cycle", *SOURCE_KEYS, "link", "pre_pass", "post_pass",
        "min_viable_contact")


def read_windows(t: Table, base: Path) -> WindowSettings:
    """The [windows] table (`t`, unknown keys not yet reported) as WindowSettings."""
    t.reject_unknown(KEYS)
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
    extras = _extras(t, base)
    has_windows = any(t.raw(k) not in (MISSING, [])
                      for k in ("intervals", "daily", "cycle", *SOURCE_KEYS))
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


def _extras(t: Table, base: Path) -> dict[str, Any]:
    """WindowSettings fields beyond mode/intervals/daily/cycle: sources, link, pass margins."""
    out: dict[str, Any] = {}
    for kind in SOURCES:
        out.update(kind.read_settings(t, base))
    if t.has("link"):
        out["link"] = _link(t.table("link", LINK_KEYS))
    for key, field in (("pre_pass", "pre_pass_s"), ("post_pass", "post_pass_s"),
                       ("min_viable_contact", "min_viable_contact_s")):
        value = t.duration(key, None)
        if value is not None:
            out[field] = value
    return out


def _link(t: Table) -> LinkSettings:
    d = LinkSettings()
    probe = t.string("probe", d.probe)
    if probe not in ("auto", "none"):
        try:
            parse_probe(probe)
        except ValueError as e:
            t.report("probe", str(e), "or leave it out for auto")
    interval = t.duration("probe_interval", d.interval_s)
    t.positive("probe_interval", interval, 'give a duration such as "5s"')
    timeout = t.duration("probe_timeout", d.timeout_s)
    t.positive("probe_timeout", timeout, 'give a duration such as "2s"')
    t.ensure("probe_timeout", timeout <= interval, "must not be longer than probe_interval",
             "lower probe_timeout or raise probe_interval")
    down = t.integer("down_after", d.down_after)
    t.ensure("down_after", 1 <= down <= 10, "must be between 1 and 10", "2 suits most links")
    up = t.integer("up_after", d.up_after)
    t.ensure("up_after", 1 <= up <= 10, "must be between 1 and 10", "2 suits most links")
    learn = t.raw("learn")
    if t.has("learn") and not isinstance(learn, bool):
        t.report("learn", "must be true or false", "write learn = true or learn = false")
        learn = d.learn
    return LinkSettings(probe=probe, interval_s=interval, timeout_s=timeout, down_after=down,
                        up_after=up, learn=bool(learn) if t.has("learn") else d.learn)
