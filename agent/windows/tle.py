"""Predicted passes from orbital elements (TLE or OMM files) with skyfield, offline.

A pass is a contact while the satellite stands above both `min_elevation_deg` and the site's
horizon mask (azimuth -> minimum elevation, for buildings and terrain). Passes of different
satellites that overlap merge into one window; windows shorter than `min_viable_contact_s` are
dropped. Element files (parsed by agent/windows/elements.py) are re-read when they change (a cron
job refreshing them is the normal case); a file that stops parsing keeps the previous elements in
force and is reported.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from agent.config.settings import TleSettings
from agent.obs.logs import log_event
from agent.windows import (
    PREDICT_AHEAD_S,
    PREDICT_BEHIND_S,
    Contact,
    ContactSource,
    WindowFileError,
)
from agent.windows.elements import ElementSet, read_elements, select
from agent.windows.schedule import merge

log = logging.getLogger("skyferry.windows")
DAY_S = 86400.0
STALE_LOG_EVERY_S = 86400.0
# Within a pass, elevation and mask are sampled this often before each crossing is refined by
# bisection; a dip behind an obstacle shorter than this can be missed (and would be useless).
_SAMPLE_S = 4.0
_BISECT_STEPS = 14  # 4 s / 2**14: well under a millisecond


# ---- prediction -------------------------------------------------------------------------------


_TS: Any = None


def timescale() -> Any:
    """skyfield's timescale from its built-in tables: no download, ever."""
    global _TS
    if _TS is None:
        from skyfield.api import load

        _TS = load.timescale(builtin=True)
    return _TS


def satellite(es: ElementSet) -> Any:
    from skyfield.api import EarthSatellite

    ts = timescale()
    if es.omm is not None:
        return EarthSatellite.from_omm(ts, es.omm)
    return EarthSatellite(es.line1, es.line2, es.name, ts)


class HorizonMask:
    """Minimum elevation by azimuth, linear between the given points, wrapping round north."""

    def __init__(self, points: Sequence[tuple[float, float]]) -> None:
        pts = sorted((az % 360.0, el) for az, el in points)
        self.az = np.array([p[0] for p in pts], dtype=float)
        self.el = np.array([p[1] for p in pts], dtype=float)

    def __bool__(self) -> bool:
        return len(self.az) > 0

    def min_elevation(self, az_deg: np.ndarray) -> np.ndarray:
        if len(self.az) == 1:
            return np.full_like(az_deg, self.el[0], dtype=float)
        return np.asarray(np.interp(az_deg % 360.0, self.az, self.el, period=360.0), dtype=float)

    @property
    def lowest(self) -> float:
        return float(self.el.min())


@dataclass(frozen=True)
class Pass:
    start: float
    end: float
    max_elevation_deg: float
    name: str


def _altaz(sat: Any, site: Any, jd_tt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elevation and azimuth (degrees) of `sat` seen from `site` at TT Julian dates.

    Uses the shortcut skyfield's own find_events uses: satellite and site are both rotated by
    the same Earth orientation, which cancels out, so it is skipped (no nutation series).
    """
    t = timescale().tt_jd(jd_tt)
    t.gast = t.tt * 0.0
    t.M = t.MT = np.identity(3)
    alt, az, _ = (sat - site).at(t).altaz()
    return alt.degrees, az.degrees


def _threshold(el_min: float, mask: HorizonMask | None, az: np.ndarray) -> np.ndarray:
    if not mask:
        return np.full_like(az, el_min, dtype=float)
    return np.asarray(np.maximum(el_min, mask.min_elevation(az)), dtype=float)


def predict_passes(sat: Any, site: Any, start: float, end: float, min_elevation_deg: float,
                   mask: HorizonMask | None = None, name: str = "") -> list[Pass]:
    """Every interval in [start, end) with the satellite above max(min elevation, mask)."""
    ts = timescale()
    base = max(min_elevation_deg, mask.lowest) if mask else min_elevation_deg
    t0 = ts.from_datetime(datetime.fromtimestamp(start, UTC))
    t1 = ts.from_datetime(datetime.fromtimestamp(end, UTC))
    times, events = sat.find_events(site, t0, t1, altitude_degrees=base)
    tt = np.asarray(times.tt, dtype=float).reshape(-1)
    ev = np.asarray(events).reshape(-1)
    # Intervals above `base`, closing any that begin before start or run past end.
    jd_start, jd_end = float(t0.tt), float(t1.tt)
    # Above at `start` when the first event is not a rise; with no event at all, look.
    if len(ev):
        above_at_start = bool(ev[0] != 0)
    else:
        above_at_start = bool(_altaz(sat, site, np.array([jd_start]))[0][0] >= base)
    intervals: list[list[float]] = []
    rising = jd_start if above_at_start else None
    for jd, e in zip(tt, ev, strict=True):
        if e == 0:
            rising = jd
        elif e == 2:
            intervals.append([jd_start if rising is None else rising, jd])
            rising = None
    if rising is not None:
        intervals.append([rising, jd_end])
    if not intervals:
        return []
    # TT Julian date -> Unix seconds. TT-UTC only changes at a leap second (none announced
    # since 2017), so the offset at `start` holds for the whole range.
    offset = (jd_start - _JD_UNIX_EPOCH) * DAY_S - start

    def unix(jd: float) -> float:
        return float((jd - _JD_UNIX_EPOCH) * DAY_S - offset)

    if not mask or float(mask.el.max()) <= min_elevation_deg:  # the mask never bites
        culm = tt[ev == 1]
        culm_alt = _altaz(sat, site, culm)[0] if len(culm) else np.array([])
        out = []
        for a, b in intervals:
            inside = culm_alt[(culm >= a) & (culm <= b)]
            peak = float(inside.max()) if len(inside) else float(
                _altaz(sat, site, np.array([a, b]))[0].max())
            out.append(Pass(unix(a), unix(b), peak, name))
        return out
    return [Pass(unix(a), unix(b), peak, name)
            for a, b, peak in _masked(sat, site, intervals, min_elevation_deg, mask)]


def _masked(sat: Any, site: Any, intervals: list[list[float]], min_el: float,
            mask: HorizonMask) -> list[tuple[float, float, float]]:
    """Cut each pass to where it clears the mask: sample, then bisect every crossing."""
    step = _SAMPLE_S / DAY_S
    grids = [np.append(np.arange(a, b, step), b) for a, b in intervals]
    jd = np.concatenate(grids)
    alt, az = _altaz(sat, site, jd)
    above = alt - _threshold(min_el, mask, az) >= 0
    lo_list, hi_list, rising_list, slots = [], [], [], []
    offset = 0
    pieces: list[list[Any]] = []
    for grid in grids:
        n = len(grid)
        a_up = above[offset:offset + n]
        alts = alt[offset:offset + n]
        k = 0
        while k < n:
            if not a_up[k]:
                k += 1
                continue
            m = k
            while m + 1 < n and a_up[m + 1]:
                m += 1
            piece: list[Any] = [float(grid[k]), float(grid[m]), float(alts[k:m + 1].max())]
            if k > 0:  # the crossing lies between grid[k-1] and grid[k]
                lo_list.append(grid[k - 1])
                hi_list.append(grid[k])
                rising_list.append(True)
                slots.append((len(pieces), 0))
            if m < n - 1:
                lo_list.append(grid[m])
                hi_list.append(grid[m + 1])
                rising_list.append(False)
                slots.append((len(pieces), 1))
            pieces.append(piece)
            k = m + 1
        offset += n
    if lo_list:
        lo, hi = np.array(lo_list), np.array(hi_list)
        rising = np.array(rising_list)
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            a, z = _altaz(sat, site, mid)
            up = a - _threshold(min_el, mask, z) >= 0
            # For a rise the above side is hi, for a set it is lo.
            move_hi = up == rising
            hi = np.where(move_hi, mid, hi)
            lo = np.where(move_hi, lo, mid)
        for (index, side), l_, h in zip(slots, lo, hi, strict=True):
            pieces[index][side] = float(l_ + h) / 2
    return [(a, b, peak) for a, b, peak in pieces if b > a]


_JD_UNIX_EPOCH = 2440587.5  # 1970-01-01T00:00 as a Julian date


# ---- the source the schedule asks ---------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    stamps: tuple[tuple[int, int] | None, ...]
    sets: tuple[ElementSet, ...]
    sats: tuple[Any, ...]


class TleSource(ContactSource):
    """Predicted passes for the configured satellites, cached over a moving horizon."""

    def __init__(self, settings: TleSettings, min_viable_s: float = 0.0,
                 on_reload: Callable[[TleSource], None] | None = None) -> None:
        from skyfield.api import wgs84

        self.settings = settings
        self.min_viable_s = min_viable_s
        self.on_reload = on_reload
        self.site = wgs84.latlon(settings.latitude_deg, settings.longitude_deg,
                                 elevation_m=settings.altitude_m)
        self.mask = HorizonMask(settings.horizon_mask) if settings.horizon_mask else None
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._cache: tuple[float, float, tuple[Contact, ...]] = (0.0, 0.0, ())
        self.last_error: str | None = None
        self.last_pass_count = 0  # passes before merging, in the last prediction
        # Stale elements are logged when they change, else once a day.
        self._stale_logged: tuple[float, object] = (-math.inf, None)
        self.reload()

    # -- elements --

    def _stamps(self) -> tuple[tuple[int, int] | None, ...]:
        out: list[tuple[int, int] | None] = []
        for f in self.settings.files:
            try:
                st = os.stat(f)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def reload(self) -> bool:
        """Re-read the element files if any changed; True when new elements took effect.

        The first load raises on a bad file. Later, a bad or missing file keeps the previous
        elements (a half-written refresh must not blank the schedule) and sets `last_error`.
        """
        stamps = self._stamps()
        with self._lock:
            if self._loaded is not None and stamps == self._loaded.stamps:
                return False
            try:
                sets: list[ElementSet] = []
                for f in self.settings.files:
                    sets.extend(read_elements(f))
                chosen = select(sets, self.settings.satellites)
                sats = tuple(satellite(s) for s in chosen)
            except WindowFileError as e:
                if self._loaded is None:
                    raise
                self.last_error = str(e)
                # Remember the stamps so a broken file is reported once, not at every check.
                self._loaded = _Loaded(stamps, self._loaded.sets, self._loaded.sats)
                return False
            self.last_error = None
            self._loaded = _Loaded(stamps, tuple(chosen), sats)
            self._cache = (0.0, 0.0, ())
        if self.on_reload is not None:
            self.on_reload(self)
        return True

    @property
    def element_sets(self) -> tuple[ElementSet, ...]:
        return self._loaded.sets if self._loaded else ()

    def ages_s(self, now: float) -> dict[str, float]:
        """Age of each satellite's elements, by name."""
        return {s.name: now - s.epoch for s in self.element_sets}

    def stale(self, now: float) -> dict[str, float]:
        limit = self.settings.stale_after_s
        return {n: a for n, a in self.ages_s(now).items() if a > limit}

    # -- passes --

    def predict(self, start: float, end: float) -> list[Contact]:
        """Merged windows over [start, end), computed now (blocking: call from a thread)."""
        loaded = self._loaded
        if loaded is None:
            return []
        passes: list[Contact] = []
        for es, sat in zip(loaded.sets, loaded.sats, strict=True):
            for p in predict_passes(sat, self.site, start, end, self.settings.min_elevation_deg,
                                    self.mask, es.name):
                passes.append(Contact(p.start, p.end, self.settings.rate_bps, "tle",
                                      round(p.max_elevation_deg, 1), es.name))
        self.last_pass_count = len(passes)
        windows = merge(passes)
        return [c for c in windows if c.duration_s >= self.min_viable_s
                # A window cut by the range ends is kept: only its visible part is short.
                or c.start <= start or c.end >= end]

    def ensure(self, start: float, end: float) -> None:
        """Make sure [start, end) is predicted (re-reading changed files first); blocking."""
        self.reload()
        lo, hi, _ = self._cache
        if hi > lo and lo <= start and end <= hi:
            return
        # Predict a day beyond what was asked, so a steadily advancing clock recomputes
        # about once a day rather than at every check.
        self._cache = (start, end + DAY_S, tuple(self.predict(start, end + DAY_S)))

    def contacts(self, start: float, end: float) -> list[Contact]:
        """Cached windows overlapping [start, end); never computes (the gate calls this)."""
        windows = self._cache[2]
        return [c for c in windows if c.end > start and c.start < end]

    @property
    def covered(self) -> tuple[float, float]:
        return self._cache[0], self._cache[1]

    # -- upkeep (ContactSource hooks) --

    def prepare(self, start: float, end: float) -> None:
        self.ensure(start, end)

    def refresh(self, now: float) -> list[str]:
        before = self.last_error
        self.ensure(now - PREDICT_BEHIND_S, now + PREDICT_AHEAD_S)
        if self.last_error and self.last_error != before:
            return [f"orbital elements not reloaded, the previous ones stay in force: "
                    f"{self.last_error}"]
        return []

    def watch(self, now: float, metrics: Any) -> None:
        stale = self.stale(now)
        ages = self.ages_s(now)
        if metrics is not None and ages:
            metrics.tle_age_days.set(max(ages.values()) / 86400)
            metrics.tle_stale.set(len(stale))
        sets = self.element_sets
        last_log, last_sets = self._stale_logged
        if stale and (sets is not last_sets or now - last_log > STALE_LOG_EVERY_S):
            oldest = max(stale.values()) / 86400
            log_event(log, logging.WARNING, "tle_stale",
                      f"orbital elements of {len(stale)} satellite(s) are older than "
                      f"{self.settings.stale_after_s / 86400:g} days (oldest "
                      f"{oldest:.1f} days): predicted passes drift; refresh the files",
                      satellites=sorted(stale)[:10])
            last_log = now
        self._stale_logged = (last_log, sets)

    def warnings(self, now: float) -> list[str]:
        return [f"elements of {name} are {age / 86400:.1f} days old: passes drift; "
                "refresh the element file" for name, age in sorted(self.stale(now).items())]
