"""Every window source together: what the gate, `skyferry windows` and `status` ask.

`build_forecast` turns [windows] into one `Schedule` whose contacts are the union of the
configured intervals, daily windows and cycle, the weekly timetable and the predicted passes
(merged where they overlap), plus the learned availability model for always-on links. Only
`Forecast.maintain` (a daemon task) does slow work, in a thread: re-reading changed element and
timetable files and predicting passes ahead; the gate only reads cached results.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.config.settings import WindowSettings
from agent.obs.logs import log_event
from agent.windows import Contact, ContactSource, WindowFileError
from agent.windows.learned import LearnedModel
from agent.windows.schedule import Schedule
from agent.windows.timetable import Timetable
from agent.windows.tle import TleSource

log = logging.getLogger("skyferry.windows")
HOUR = 3600.0
# The daemon keeps passes predicted this far ahead (and a little behind, for a window in
# progress); `skyferry windows --hours` predicts whatever it is asked for.
PREDICT_BEHIND_S = 6 * HOUR
PREDICT_AHEAD_S = 48 * HOUR
MAINTAIN_EVERY_S = 10.0
STALE_LOG_EVERY_S = 24 * HOUR


@dataclass
class Forecast:
    settings: WindowSettings
    schedule: Schedule
    base: Schedule  # intervals, daily, cycle only: for the rate at an instant
    timetables: tuple[Timetable, ...]
    tle: TleSource | None
    learned: LearnedModel | None = None

    # ---- what the gate and the uplink ask (cheap, cached) -------------------------------

    def window_at(self, t: float) -> Contact | None:
        return self.schedule.window_at(t)

    def next_window_start(self, t: float) -> float | None:
        """When the next window opens, if none is open at t."""
        if self.schedule.window_at(t) is not None:
            return None
        return self.schedule.next_change(t)

    def rate_at(self, t: float) -> float | None:
        """The expected (and capped) rate at t: the lowest any source open at t gives."""
        rates: list[float] = []
        base = self.base.window_at(t)
        if base is not None and base.rate_bps is not None and not self.schedule.always:
            rates.append(base.rate_bps)
        sources: list[ContactSource] = list(self.timetables)
        if self.tle is not None:
            sources.append(self.tle)
        for src in sources:
            for c in src.contacts(t, t + 1e-3):
                if c.start <= t < c.end and c.rate_bps is not None:
                    rates.append(c.rate_bps)
        return min(rates) if rates else None

    # ---- what people ask (may compute) --------------------------------------------------

    def upcoming(self, start: float, end: float) -> list[Contact]:
        """Windows overlapping [start, end), predicting passes as needed (blocking)."""
        if self.tle is not None:
            self.tle.ensure(start, end)
        if self.schedule.always:
            if self.learned is not None and self.learned.observed_s > 0:
                return self.learned.forecast(start, end, self.settings.min_viable_contact_s)
            return [Contact(start, math.inf, None, "always")]
        return self.schedule.contacts(start, end)

    # ---- daemon upkeep ------------------------------------------------------------------

    def refresh(self, now: float) -> list[str]:
        """Re-read changed files and predict ahead (blocking); returns problems to report."""
        problems: list[str] = []
        for tt in self.timetables:
            try:
                tt.reload()
            except WindowFileError as e:
                problems.append(f"timetable not reloaded, the previous one stays in force: {e}")
        if self.tle is not None:
            before = self.tle.last_error
            self.tle.ensure(now - PREDICT_BEHIND_S, now + PREDICT_AHEAD_S)
            if self.tle.last_error and self.tle.last_error != before:
                problems.append(f"orbital elements not reloaded, the previous ones stay in "
                                f"force: {self.tle.last_error}")
        return problems

    async def maintain(self, run_blocking: Callable[..., Awaitable[Any]],
                       clock: Callable[[], float], metrics: Any = None) -> None:
        """Daemon task: keep predictions ahead of the clock, report stale elements."""
        last_stale_log = -math.inf
        last_sets: object = None
        while True:
            now = clock()
            try:
                problems: list[str] = await run_blocking(self.refresh, now)
            except WindowFileError as e:  # only a first load raises; keep trying
                problems = [str(e)]
            for p in problems:
                log_event(log, logging.ERROR, "windows_file_error", p)
            if self.tle is not None:
                stale = self.tle.stale(now)
                ages = self.tle.ages_s(now)
                if metrics is not None and ages:
                    metrics.tle_age_days.set(max(ages.values()) / 86400)
                    metrics.tle_stale.set(len(stale))
                sets = self.tle.element_sets
                if stale and (sets is not last_sets or now - last_stale_log > STALE_LOG_EVERY_S):
                    oldest = max(stale.values()) / 86400
                    log_event(log, logging.WARNING, "tle_stale",
                              f"orbital elements of {len(stale)} satellite(s) are older than "
                              f"{self.tle.settings.stale_after_s / 86400:g} days (oldest "
                              f"{oldest:.1f} days): predicted passes drift; refresh the files",
                              satellites=sorted(stale)[:10])
                    last_stale_log = now
                last_sets = sets
            await asyncio.sleep(MAINTAIN_EVERY_S)


def build_forecast(settings: WindowSettings, anchor: float,
                   learned: LearnedModel | None = None, now: float | None = None) -> Forecast:
    """Everything [windows] configures; the first element and timetable files must parse."""
    timetables: list[Timetable] = []
    if settings.timetable:
        timetables.append(Timetable(settings.timetable))
    if settings.timetable_file is not None:
        timetables.append(Timetable(path=settings.timetable_file))
    tle = (TleSource(settings.tle, settings.min_viable_contact_s)
           if settings.tle is not None else None)
    extra: Sequence[ContactSource] = [*timetables, *([tle] if tle is not None else [])]
    forecast = Forecast(
        settings=settings,
        schedule=Schedule(settings, anchor, extra=extra),
        base=Schedule(settings, anchor),
        timetables=tuple(timetables),
        tle=tle,
        learned=learned,
    )
    if tle is not None and now is not None:
        tle.ensure(now - PREDICT_BEHIND_S, now + PREDICT_AHEAD_S)
    return forecast


# ---- presenting windows ----------------------------------------------------------------------


def iso(t: float) -> str | None:
    if math.isinf(t):
        return None
    # Whole seconds: predictions are good to about a second, more digits would be noise.
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def expected_bytes(c: Contact, fallback_rate: float | None) -> int | None:
    rate = c.rate_bps if c.rate_bps is not None else fallback_rate
    if rate is None or math.isinf(c.end):
        return None
    return int(rate * c.duration_s)


def describe(c: Contact, fallback_rate: float | None = None) -> dict[str, Any]:
    """One window as `skyferry windows --json` and `skyferry status --json` show it."""
    return {
        "start": iso(c.start),
        "end": iso(c.end),
        "duration_s": None if math.isinf(c.end) else round(c.duration_s, 1),
        "max_elevation_deg": c.max_elevation_deg,
        "source": c.source,
        "satellites": c.detail,
        "rate_bps": c.rate_bps,
        "expected_bytes": expected_bytes(c, fallback_rate),
    }


def plan_drain(windows: Sequence[Contact], queue: Sequence[tuple[str, int]],
               fallback_rate: float | None) -> list[list[tuple[str, int]]]:
    """How the queue (classes in the order they are served, with their bytes) would drain
    through the windows at their expected rates: per window, (class, bytes) sent."""
    names = [name for name, size in queue if size > 0]
    left = {name: size for name, size in queue if size > 0}
    plan: list[list[tuple[str, int]]] = []
    for w in windows:
        room = expected_bytes(w, fallback_rate)
        sent: list[tuple[str, int]] = []
        for name in names:
            if room is not None and room <= 0:
                break
            take = left[name] if room is None else min(left[name], room)
            if take > 0:
                sent.append((name, take))
                left[name] -= take
                if room is not None:
                    room -= take
        names = [n for n in names if left[n] > 0]
        plan.append(sent)
    return plan
