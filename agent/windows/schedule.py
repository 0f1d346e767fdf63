"""Windows from configuration: always, explicit UTC intervals, daily intervals, a test cycle."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from agent.config.settings import WindowSettings
from agent.windows import Contact, ContactSource

_DAY = 86400.0


class Schedule:
    """Answers "is a window open at t, and when does that change?" from the settings."""

    def __init__(self, settings: WindowSettings, anchor: float,
                 extra: Sequence[ContactSource] = ()) -> None:
        self.settings = settings
        self.anchor = anchor  # where a simulated cycle starts (normally process start)
        # Windows computed elsewhere (timetable, predicted passes): see agent/windows/forecast.py
        self.extra = tuple(extra)

    @property
    def always(self) -> bool:
        return self.settings.mode == "always"

    def contacts(self, start: float, end: float) -> list[Contact]:
        """Every window overlapping [start, end), merged where they touch, in time order."""
        if self.always:
            return [Contact(start, math.inf, None, "always")]
        found: list[Contact] = []
        s = self.settings
        for iv in s.intervals:
            a, b = iv.start.timestamp(), iv.end.timestamp()
            if b > start and a < end:
                found.append(Contact(a, b, iv.rate_bps, "interval"))
        day0 = datetime.fromtimestamp(start, UTC).replace(hour=0, minute=0, second=0,
                                                          microsecond=0) - timedelta(days=1)
        for d in s.daily:
            length = (d.end_s - d.start_s) % _DAY
            day = day0
            while day.timestamp() < end:
                a = day.timestamp() + d.start_s
                if a + length > start and a < end:
                    found.append(Contact(a, a + length, d.rate_bps, "daily"))
                day += timedelta(days=1)
        if s.cycle is not None:
            period = s.cycle.open_s + s.cycle.closed_s
            k = math.floor((start - self.anchor) / period)
            while self.anchor + k * period < end:
                a = self.anchor + k * period
                if a + s.cycle.open_s > start:
                    found.append(Contact(a, a + s.cycle.open_s, None, "cycle"))
                k += 1
        for source in self.extra:
            found.extend(source.contacts(start, end))
        return merge(found)

    def window_at(self, t: float, horizon_s: float = 8 * _DAY) -> Contact | None:
        """The window open at t, merged with every window it overlaps or touches."""
        # contacts() merges only what overlaps its range: widen the range until the window
        # lies inside it, else a window that runs on into another would report an early end.
        span = 64.0
        while True:
            hit = next((c for c in self.contacts(t - span, t + span) if c.start <= t < c.end),
                       None)
            if hit is None or self.always or span >= horizon_s or (
                    t - span < hit.start and hit.end < t + span):
                return hit
            span *= 8

    def next_change(self, t: float, horizon_s: float = 8 * _DAY) -> float | None:
        """The next instant after t at which the open/closed state flips, if within horizon."""
        current = self.window_at(t)
        if current is not None:
            return None if math.isinf(current.end) else current.end
        # Look ahead in growing steps: a short cycle has ~10^5 windows in the whole horizon,
        # and the gate asks this on the event loop several times a second.
        span = 64.0
        while True:
            upcoming = [c for c in self.contacts(t, t + min(span, horizon_s)) if c.start > t]
            if upcoming or span >= horizon_s:
                return upcoming[0].start if upcoming else None
            span *= 8


def merge(contacts: list[Contact]) -> list[Contact]:
    """Sort and merge overlapping or touching windows; a merged window keeps the lower rate."""
    out: list[Contact] = []
    for c in sorted(contacts, key=lambda c: (c.start, c.end)):
        if out and c.start <= out[-1].end:
            last = out[-1]
            rates = [r for r in (last.rate_bps, c.rate_bps) if r is not None]
            peaks = [e for e in (last.max_elevation_deg, c.max_elevation_deg) if e is not None]
            names = [n for n in (last.detail, c.detail) if n]
            out[-1] = Contact(last.start, max(last.end, c.end), min(rates) if rates else None,
                              last.source if last.source == c.source else "merged",
                              max(peaks) if peaks else None,
                              ", ".join(dict.fromkeys(", ".join(names).split(", "))) or None)
        else:
            out.append(c)
    return out
