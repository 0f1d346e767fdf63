"""Every window source together: what the gate, `skyferry windows` and `status` ask.

`build_forecast` turns [windows] into one `Schedule` whose contacts are the union of the
configured intervals, daily windows and cycle and of every configured ContactSource (timetable,
predicted passes; see agent/windows/sources.py), merged where they overlap, plus the learned
availability model for always-on links. Only `Forecast.maintain` (a daemon task) does slow work, in
a thread: the sources' `refresh` (re-reading changed files, predicting ahead); the gate only reads
cached results.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from agent.config.settings import WindowSettings
from agent.obs.logs import log_event
from agent.windows import (
    PREDICT_AHEAD_S,
    PREDICT_BEHIND_S,
    Contact,
    ContactSource,
    WindowFileError,
)
from agent.windows.learned import LearnedModel
from agent.windows.schedule import Schedule
from agent.windows.sources import open_sources

log = logging.getLogger("skyferry.windows")
MAINTAIN_EVERY_S = 10.0
S = TypeVar("S", bound=ContactSource)


@dataclass
class Forecast:
    settings: WindowSettings
    anchor: float  # where a simulated cycle starts (normally process start)
    sources: tuple[ContactSource, ...] = ()
    learned: LearnedModel | None = None
    schedule: Schedule = field(init=False)
    base: Schedule = field(init=False)  # intervals, daily, cycle only: for the rate at an instant

    def __post_init__(self) -> None:
        self.schedule = Schedule(self.settings, self.anchor, extra=self.sources)
        self.base = Schedule(self.settings, self.anchor)

    def source(self, kind: type[S]) -> S | None:
        """The first configured source of that type, if any."""
        return next((s for s in self.sources if isinstance(s, kind)), None)

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
        for src in self.sources:
            for c in src.contacts(t, t + 1e-3):
                if c.start <= t < c.end and c.rate_bps is not None:
                    rates.append(c.rate_bps)
        return min(rates) if rates else None

    # ---- what people ask (may compute) --------------------------------------------------

    def upcoming(self, start: float, end: float) -> list[Contact]:
        """Windows overlapping [start, end), predicting passes as needed (blocking)."""
        for src in self.sources:
            src.prepare(start, end)
        if self.schedule.always:
            if self.learned is not None and self.learned.observed_s > 0:
                return self.learned.forecast(start, end, self.settings.min_viable_contact_s)
            return [Contact(start, math.inf, None, "always")]
        return self.schedule.contacts(start, end)

    def warnings(self, now: float) -> list[str]:
        """What the sources say about their inputs (stale elements, ...)."""
        return [w for src in self.sources for w in src.warnings(now)]

    # ---- daemon upkeep ------------------------------------------------------------------

    def refresh(self, now: float) -> list[str]:
        """Re-read changed files and predict ahead (blocking); returns problems to report."""
        return [p for src in self.sources for p in src.refresh(now)]

    async def maintain(self, run_blocking: Callable[..., Awaitable[Any]],
                       clock: Callable[[], float], metrics: Any = None) -> None:
        """Daemon task: keep predictions ahead of the clock, report stale inputs."""
        while True:
            now = clock()
            try:
                problems: list[str] = await run_blocking(self.refresh, now)
            except WindowFileError as e:  # only a first load raises; keep trying
                problems = [str(e)]
            for p in problems:
                log_event(log, logging.ERROR, "windows_file_error", p)
            for src in self.sources:
                src.watch(now, metrics)
            await asyncio.sleep(MAINTAIN_EVERY_S)


def build_forecast(settings: WindowSettings, anchor: float,
                   learned: LearnedModel | None = None, now: float | None = None) -> Forecast:
    """Everything [windows] configures; the first element and timetable files must parse."""
    forecast = Forecast(settings, anchor, tuple(open_sources(settings)), learned)
    if now is not None:
        for src in forecast.sources:
            src.prepare(now - PREDICT_BEHIND_S, now + PREDICT_AHEAD_S)
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
