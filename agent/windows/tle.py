"""Predicted passes from orbital elements (TLE or OMM files) with skyfield, offline.

A pass is a contact while the satellite stands above both `min_elevation_deg` and the site's
horizon mask (azimuth -> minimum elevation, for buildings and terrain). Passes of different
satellites that overlap merge into one window; windows shorter than `min_viable_contact_s` are
dropped. Element files are re-read when they change (a cron job refreshing them is the normal
case); a file that stops parsing keeps the previous elements in force and is reported.

Every parse error names the file, the line and the field, e.g.
`relay.tle:7: line 2, field "inclination" (columns 9-16): not a number (got '51.6a02')`.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from agent.config.settings import TleSettings
from agent.windows import Contact, WindowFileError
from agent.windows.schedule import merge

DAY_S = 86400.0
STALE_AFTER_S = 14 * DAY_S
# Within a pass, elevation and mask are sampled this often before each crossing is refined by
# bisection; a dip behind an obstacle shorter than this can be missed (and would be useless).
_SAMPLE_S = 4.0
_BISECT_STEPS = 14  # 4 s / 2**14: well under a millisecond


# ---- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElementSet:
    """One satellite's elements as read from a file (not yet turned into a propagator)."""

    name: str
    catalog: str
    epoch: float  # Unix seconds
    where: str  # "file:line" (or "file:record N"), for messages
    line1: str | None = None  # TLE
    line2: str | None = None
    omm: dict[str, str] | None = None  # OMM fields, normalized for sgp4.omm.initialize


# (name, first column, last column) with 1-based inclusive columns as in the TLE definition.
_NUMBER = r"\s*[+-]?(?:\d+\.?\d*|\.\d+)"  # right-aligned: leading blanks
_EXP = r"\s*[+-]?\d{5}[+-]\d"  # an assumed-decimal number with exponent, e.g. " 48567-4"
_L1: tuple[tuple[str, int, int, str], ...] = (
    ("line number", 1, 1, r"1"),
    ("catalog number", 3, 7, r"[0-9A-Z ]\d{4}|\s*\d{1,5}"),
    ("classification", 8, 8, r"[UCS ]"),
    ("epoch year", 19, 20, r"\d\d"),
    ("epoch day", 21, 32, r"[ \d]{0,2}\d\.\d+"),
    ("mean motion derivative", 34, 43, _NUMBER),
    ("mean motion second derivative", 45, 52, _EXP),
    ("bstar drag term", 54, 61, _EXP),
    ("ephemeris type", 63, 63, r"[\d ]"),
    ("element set number", 65, 68, r"\s*\d*"),
    ("checksum", 69, 69, r"\d"),
)
_L2: tuple[tuple[str, int, int, str], ...] = (
    ("line number", 1, 1, r"2"),
    ("catalog number", 3, 7, r"[0-9A-Z ]\d{4}|\s*\d{1,5}"),
    ("inclination", 9, 16, _NUMBER),
    ("right ascension of the ascending node", 18, 25, _NUMBER),
    ("eccentricity", 27, 33, r"\d{7}"),
    ("argument of perigee", 35, 42, _NUMBER),
    ("mean anomaly", 44, 51, _NUMBER),
    ("mean motion", 53, 63, _NUMBER),
    ("revolution number", 64, 68, r"\s*\d*"),
    ("checksum", 69, 69, r"\d"),
)
_RANGES = {"inclination": (0.0, 180.0), "right ascension of the ascending node": (0.0, 360.0),
           "argument of perigee": (0.0, 360.0), "mean anomaly": (0.0, 360.0),
           "mean motion": (0.05, 20.0), "epoch day": (1.0, 367.0)}


def tle_checksum(line: str) -> int:
    """Modulo-10 sum of the digits of the first 68 columns, minus signs counting 1."""
    return sum(int(c) if c.isdigit() else (1 if c == "-" else 0) for c in line[:68]) % 10


def _check_line(path: str, lineno: int, text: str, which: int) -> None:
    spec = _L1 if which == 1 else _L2
    for name, a, b, pattern in spec:
        cols = f"column {a}" if a == b else f"columns {a}-{b}"
        field = f'line {which}, field "{name}" ({cols})'
        value = text[a - 1:b]
        if len(value) < b - a + 1 and not (name == "checksum" and len(text) == 68):
            raise WindowFileError(path, lineno, field,
                                  f"missing: the line has {len(text)} characters, a TLE line 69")
        if name == "checksum":
            if len(value) == 0:
                raise WindowFileError(path, lineno, field,
                                      "missing: the line has 68 characters, a TLE line 69")
            if not value.isdigit():
                raise WindowFileError(path, lineno, field, f"not a digit (got {value!r})")
            want = tle_checksum(text)
            if int(value) != want:
                raise WindowFileError(
                    path, lineno, field,
                    f"is {value} but the line sums to {want}: the line was damaged or edited; "
                    "fetch the elements again")
            continue
        if re.fullmatch(pattern, value) is None:
            raise WindowFileError(path, lineno, field, f"not a valid value (got {value!r})")
        if name in _RANGES:
            lo, hi = _RANGES[name]
            number = float(value)
            if not lo <= number <= hi:
                raise WindowFileError(path, lineno, field,
                                      f"{number:g} is outside {lo:g}..{hi:g}")
    if len(text) > 69:
        raise WindowFileError(path, lineno, f"line {which}, length",
                              f"the line has {len(text)} characters, a TLE line 69")


def _tle_epoch(line1: str) -> float:
    year = int(line1[18:20])
    year += 1900 if year >= 57 else 2000
    day = float(line1[20:32])
    return (datetime(year, 1, 1, tzinfo=UTC) + timedelta(days=day - 1)).timestamp()


def parse_tle_text(text: str, path: str) -> list[ElementSet]:
    """Two- or three-line element sets; a line before a line 1 (or `0 NAME`) names it."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    out: list[ElementSet] = []
    i = 0
    pending_name: tuple[int, str] | None = None
    while i < len(lines):
        ln = lines[i]
        if not ln.strip():
            i += 1
            continue
        if ln.startswith("1 "):
            _check_line(path, i + 1, ln, 1)
            j = i + 1
            if j >= len(lines) or not lines[j].startswith("2 "):
                raise WindowFileError(path, j + 1, "line 2",
                                      f"missing: the line 1 on line {i + 1} must be followed by "
                                      "its line 2 (starting with '2 ')")
            _check_line(path, j + 1, lines[j], 2)
            if lines[j][2:7] != ln[2:7]:
                raise WindowFileError(
                    path, j + 1, 'line 2, field "catalog number" (columns 3-7)',
                    f"is {lines[j][2:7].strip()!r} but line 1 says {ln[2:7].strip()!r}: the two "
                    "lines belong to different satellites")
            catalog = ln[2:7].strip()
            name = pending_name[1] if pending_name else catalog
            out.append(ElementSet(name=name, catalog=catalog, epoch=_tle_epoch(ln),
                                  where=f"{path}:{i + 1}", line1=ln[:69], line2=lines[j][:69]))
            pending_name = None
            i = j + 1
            continue
        if ln.startswith("2 "):
            raise WindowFileError(path, i + 1, "line 1",
                                  "missing: this line 2 has no line 1 (starting with '1 ') "
                                  "before it")
        if pending_name is not None:
            raise WindowFileError(
                path, pending_name[0], "name",
                f"{pending_name[1]!r} is not followed by a TLE line 1 (line {i + 1} is "
                f"{ln[:30]!r}); each satellite is an optional name line, then line 1 and line 2")
        name = ln[2:].strip() if ln.startswith("0 ") else ln.strip()
        pending_name = (i + 1, name)
        i += 1
    if pending_name is not None:
        raise WindowFileError(path, pending_name[0], "line 1",
                              f"missing: the name {pending_name[1]!r} is not followed by its "
                              "element lines")
    return out


# OMM: the fields sgp4 needs, and defaults for the bookkeeping ones it insists on.
_OMM_NUMBERS = ("MEAN_MOTION", "ECCENTRICITY", "INCLINATION", "RA_OF_ASC_NODE",
                "ARG_OF_PERICENTER", "MEAN_ANOMALY", "BSTAR", "MEAN_MOTION_DOT",
                "MEAN_MOTION_DDOT")
_OMM_DEFAULTS = {"CLASSIFICATION_TYPE": "U", "OBJECT_ID": "", "EPHEMERIS_TYPE": "0",
                 "ELEMENT_SET_NO": "999", "REV_AT_EPOCH": "0", "MEAN_MOTION_DDOT": "0"}


def _omm_record(raw: dict[str, Any], path: str, line: int | None, where: str) -> ElementSet:
    fields = {k.upper(): "" if v is None else str(v).strip() for k, v in raw.items()}
    for k, v in _OMM_DEFAULTS.items():
        if not fields.get(k):
            fields[k] = v
    label = f"{where}, field"
    for name in ("NORAD_CAT_ID", "EPOCH", *_OMM_NUMBERS):
        if not fields.get(name):
            raise WindowFileError(path, line, f"{label} {name}", "missing")
    for name in _OMM_NUMBERS:
        try:
            number = float(fields[name])
        except ValueError:
            raise WindowFileError(path, line, f"{label} {name}",
                                  f"not a number (got {fields[name]!r})") from None
        if not math.isfinite(number):
            raise WindowFileError(path, line, f"{label} {name}", "not a finite number")
    if not fields["NORAD_CAT_ID"].isdigit():
        raise WindowFileError(path, line, f"{label} NORAD_CAT_ID",
                              f"not a catalog number (got {fields['NORAD_CAT_ID']!r})")
    for name in ("EPHEMERIS_TYPE", "ELEMENT_SET_NO", "REV_AT_EPOCH"):
        if not fields[name].lstrip("-").isdigit():
            raise WindowFileError(path, line, f"{label} {name}",
                                  f"not a whole number (got {fields[name]!r})")
    try:
        epoch = datetime.fromisoformat(fields["EPOCH"].replace("Z", ""))
    except ValueError:
        raise WindowFileError(path, line, f"{label} EPOCH",
                              f"not an ISO-8601 time (got {fields['EPOCH']!r})") from None
    if epoch.tzinfo is not None:
        epoch = epoch.astimezone(UTC).replace(tzinfo=None)
    fields["EPOCH"] = epoch.strftime("%Y-%m-%dT%H:%M:%S.%f")  # the form sgp4.omm expects
    return ElementSet(name=fields.get("OBJECT_NAME") or fields["NORAD_CAT_ID"],
                      catalog=fields["NORAD_CAT_ID"], epoch=epoch.replace(tzinfo=UTC).timestamp(),
                      where=f"{path}:{line}" if line else f"{path} {where}", omm=fields)


def parse_omm_json(text: str, path: str) -> list[ElementSet]:
    """CelesTrak / Space-Track JSON: an array of OMM records (or one record)."""
    dec = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos:pos + 1] == "{":
        text = "[" + text[pos:] + "]"
        pos = 0
    if text[pos:pos + 1] != "[":
        raise WindowFileError(path, 1, "OMM JSON", "expected an array of OMM records")
    out: list[ElementSet] = []
    pos += 1
    index = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise WindowFileError(path, e.lineno, "OMM JSON", e.msg) from None
        index += 1
        if not isinstance(record, dict):
            raise WindowFileError(path, line, f"record {index}", "is not a JSON object")
        out.append(_omm_record(record, path, line, f"record {index}"))
    return out


def parse_omm_csv(text: str, path: str) -> list[ElementSet]:
    reader = csv.DictReader(io.StringIO(text))
    out = []
    for index, row in enumerate(reader, start=1):
        out.append(_omm_record(dict(row), path, reader.line_num, f"record {index}"))
    return out


def parse_omm_xml(text: str, path: str) -> list[ElementSet]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise WindowFileError(path, e.position[0], "OMM XML", str(e)) from None
    out = []
    for index, segment in enumerate(root.iter("segment"), start=1):
        fields: dict[str, Any] = {}
        for part in ("metadata", "data/meanElements", "data/tleParameters"):
            node = segment.find(part)
            if node is not None:
                fields.update((child.tag, child.text) for child in node)
        out.append(_omm_record(fields, path, None, f"segment {index}"))
    return out


def parse_elements(text: str, path: str) -> list[ElementSet]:
    """Any supported element file, told apart by its first character or header."""
    head = text.lstrip()[:1]
    if head in ("[", "{"):
        return parse_omm_json(text, path)
    if head == "<":
        return parse_omm_xml(text, path)
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if "OBJECT_NAME" in first.upper() or "NORAD_CAT_ID" in first.upper():
        return parse_omm_csv(text, path)
    return parse_tle_text(text, path)


def read_elements(path: Path) -> list[ElementSet]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WindowFileError(str(path), None, "file",
                              "not found; fetch the elements (e.g. from CelesTrak) into it"
                              ) from None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or a NUL in the name
        raise WindowFileError(str(path), None, "file", f"cannot read it: {e}") from None
    sets = parse_elements(text, str(path))
    if not sets:
        raise WindowFileError(str(path), None, "file", "holds no element set")
    return sets


def select(sets: Sequence[ElementSet], patterns: Sequence[str]) -> list[ElementSet]:
    """Keep the sets whose name matches a glob, or whose catalog number is listed."""
    if not patterns:
        return list(sets)
    pats = [p.upper() for p in patterns]
    return [s for s in sets if any(
        fnmatch.fnmatchcase(s.name.upper(), p) or s.catalog.lstrip("0") == p.lstrip("0")
        for p in pats)]


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


class TleSource:
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
