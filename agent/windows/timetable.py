"""Weekly timetables in rclone's `--bwlimit` style: `"Mon-08:00,10Mbit/s Mon-18:00,off"`.

Each entry says what holds from its moment on, until the next entry (wrapping round the week):
`DAY-HH:MM,RATE` (DAY is Mon..Sun) or `HH:MM,RATE` (every day). RATE is a rate in the config's
units ("10Mbit/s", "2MB/s"): the link is usable and capped at that rate; `on` means usable with no
cap; `off` means no window. Note the one difference from rclone, where `off` lifts the limit:
here a timetable describes when the link exists, so `off` closes it.

A timetable comes inline (`[windows] timetable = "..."`) or from a file
(`timetable_file`: entries separated by spaces or newlines, `#` starts a comment), which is
re-read when it changes. Every parse error names the file (or config key), the line, the entry
and the field (day, time or rate).
"""

from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path
from typing import Any

from agent.config import units
from agent.config.settings import TimetableEntry, WindowSettings
from agent.config.table import Table
from agent.windows import Contact, ContactSource, WindowFileError

DAY_S = 86400
WEEK_S = 7 * DAY_S
# 1970-01-01 was a Thursday: the first Monday 00:00 UTC is 4 days later.
_MONDAY0 = 4 * DAY_S
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME_RE = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?")


def week_start(t: float) -> float:
    """Monday 00:00 UTC of the week holding t."""
    return math.floor((t - _MONDAY0) / WEEK_S) * WEEK_S + _MONDAY0


def parse_entry(token: str) -> TimetableEntry:
    """One `DAY-HH:MM,RATE` token; raises ValueError('<field>: <problem>') on a bad one."""
    when, comma, what = token.partition(",")
    if not comma or not what:
        raise ValueError('entry: expected DAY-HH:MM,RATE or HH:MM,RATE (e.g. "Mon-08:00,10Mbit/s"'
                         ' or "18:00,off")')
    day: int | None = None
    if "-" in when:
        day_text, _, when = when.partition("-")
        key = day_text.strip().lower()[:3]
        if key not in DAYS or len(day_text.strip()) < 3:
            raise ValueError(f"day: {day_text!r} is not a day of the week; use Mon, Tue, Wed, "
                             "Thu, Fri, Sat or Sun")
        day = DAYS.index(key)
    match = _TIME_RE.fullmatch(when.strip())
    if match is None:
        raise ValueError(f"time: {when!r} is not a time of day; write HH:MM (UTC, 00:00-23:59)")
    at_s = int(match[1]) * 3600 + int(match[2]) * 60 + int(match[3] or 0)
    word = what.strip().lower()
    if word == "off":
        return TimetableEntry(day, at_s, open=False)
    if word in ("on", "unlimited"):
        return TimetableEntry(day, at_s, open=True)
    try:
        rate = units.parse_rate(what.strip())
    except ValueError as e:
        raise ValueError(f"rate: {e}; or off (no window) or on (open, no cap)") from None
    if rate <= 0:
        raise ValueError("rate: must be greater than zero; write off for no window")
    return TimetableEntry(day, at_s, open=True, rate_bps=rate)


def parse_timetable(text: str, path: str = "<timetable>",
                    first_line: int | None = 1) -> tuple[TimetableEntry, ...]:
    """Parse a whole timetable; errors name `path`, the line (None for inline text) and field."""
    entries: list[TimetableEntry] = []
    seen: dict[tuple[int, int], str] = {}
    for offset, raw in enumerate(text.splitlines()):
        line = None if first_line is None else first_line + offset
        for token in raw.split("#", 1)[0].split():
            try:
                entry = parse_entry(token)
            except ValueError as e:
                field, _, problem = str(e).partition(": ")
                raise WindowFileError(path, line, f"entry {token!r}, field {field}",
                                      problem) from None
            for d in _days(entry):
                moment = (d, entry.at_s)
                if moment in seen:
                    raise WindowFileError(
                        path, line, f"entry {token!r}, field time",
                        f"the same moment of the week as entry {seen[moment]!r}; keep one")
                seen[moment] = token
            entries.append(entry)
    if not entries:
        raise WindowFileError(path, None, "entries", "no entry; write e.g. "
                              '"Mon-08:00,10Mbit/s Mon-18:00,off"')
    return tuple(entries)


def _days(entry: TimetableEntry) -> range:
    return range(7) if entry.day is None else range(entry.day, entry.day + 1)


def load_timetable_file(path: Path) -> tuple[TimetableEntry, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WindowFileError(str(path), None, "file", "not found") from None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or a NUL in the name
        raise WindowFileError(str(path), None, "file", f"cannot read it: {e}") from None
    return parse_timetable(text, str(path))


class Timetable(ContactSource):
    """The windows a timetable describes, as contacts (source "timetable")."""

    def __init__(self, entries: tuple[TimetableEntry, ...] = (), path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._moments: list[tuple[int, TimetableEntry]] = []
        if path is not None:
            self.reload()
        else:
            self._set(entries)

    def _set(self, entries: tuple[TimetableEntry, ...]) -> None:
        moments = sorted((d * DAY_S + e.at_s, e) for e in entries for d in _days(e))
        self._moments = [(int(t), e) for t, e in moments]

    def reload(self) -> bool:
        """Re-read the file if it changed since the last read; True when it was re-read.

        A file that stops parsing raises, and the previous timetable stays in force.
        """
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if stamp is not None and stamp == self._stamp:
                return False
            entries = load_timetable_file(self.path)
            self._set(entries)
            self._stamp = stamp
            return True

    def refresh(self, now: float) -> list[str]:
        try:
            self.reload()
        except WindowFileError as e:
            return [f"timetable not reloaded, the previous one stays in force: {e}"]
        return []

    def segments_in_week(self) -> list[tuple[int, int, TimetableEntry]]:
        """(start, end, entry) offsets within one week, covering it exactly."""
        m = self._moments
        if not m:
            return []
        out = []
        # What holds at Monday 00:00 is the last entry of the previous week.
        if m[0][0] > 0:
            out.append((0, m[0][0], m[-1][1]))
        for i, (t, e) in enumerate(m):
            out.append((t, m[i + 1][0] if i + 1 < len(m) else WEEK_S, e))
        return out

    def contacts(self, start: float, end: float) -> list[Contact]:
        found: list[Contact] = []
        week = self.segments_in_week()
        w = week_start(start)
        while w < end:
            for a, b, e in week:
                s, t = w + a, w + b
                if e.open and t > start and s < end:
                    if found and found[-1].end == s and found[-1].rate_bps == e.rate_bps:
                        found[-1] = Contact(found[-1].start, t, e.rate_bps, "timetable")
                    else:
                        found.append(Contact(s, t, e.rate_bps, "timetable"))
            w += WEEK_S
        return found


# ---- configuration: the [windows] keys this source owns -----------------------------------------

KEYS = ("timetable", "timetable_file")


def read_settings(t: Table, base: Path) -> dict[str, Any]:
    """WindowSettings fields from `timetable` or `timetable_file`; the file must parse, so
    `skyferry check-config` names a bad file, line and field."""
    out: dict[str, Any] = {}
    if t.has("timetable"):
        text = t.string("timetable", None)
        if text is not None:
            try:
                out["timetable"] = parse_timetable(text, "windows.timetable", first_line=None)
            except WindowFileError as e:
                t.report("timetable", f"{e.field}: {e.problem}",
                         'entries look like "Mon-08:00,10Mbit/s Mon-18:00,off 22:00,on"')
    if t.has("timetable_file"):
        path = t.path("timetable_file", base, None)
        if path is not None:
            try:
                load_timetable_file(path)
            except WindowFileError as e:
                t.problems.append(f"{t.key('timetable_file')}: {e}")
            out["timetable_file"] = path
    if t.has("timetable") and t.has("timetable_file"):
        t.report("timetable_file", "is given together with timetable",
                 "keep one: the inline timetable or the file")
    return out


def open_sources(settings: WindowSettings) -> list[ContactSource]:
    """The timetables [windows] configures; a timetable file must parse at this first read."""
    out: list[ContactSource] = []
    if settings.timetable:
        out.append(Timetable(settings.timetable))
    if settings.timetable_file is not None:
        out.append(Timetable(path=settings.timetable_file))
    return out
