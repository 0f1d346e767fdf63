"""The [windows.tle] table: where the element files are, the site, and what counts as a pass.

The element files are parsed here too, so `skyferry check-config` names a bad file, line and field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from agent.config.settings import TleSettings, WindowSettings
from agent.config.table import Table
from agent.windows import ContactSource, WindowFileError
from agent.windows.elements import read_elements, select

KEYS = ("tle",)
TLE_KEYS = ("files", "satellites", "latitude", "longitude", "altitude", "min_elevation",
            "horizon_mask", "rate", "stale_after")


def read_settings(t: Table, base: Path) -> dict[str, Any]:
    """The WindowSettings field `tle`, when [windows.tle] is present."""
    if not t.has("tle"):
        return {}
    return {"tle": _tle(t.table("tle", TLE_KEYS), base)}


def open_sources(settings: WindowSettings) -> list[ContactSource]:
    """Predicted passes when [windows.tle] is configured; the element files must parse."""
    if settings.tle is None:
        return []
    # Imported here: the predictor loads numpy and skyfield, which reading the config (every
    # CLI verb) does not need.
    from agent.windows.tle import TleSource

    return [TleSource(settings.tle, settings.min_viable_contact_s)]


def _strings(t: Table, name: str) -> tuple[str, ...]:
    value = t.raw(name)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    t.report(name, "must be a string or a list of strings", f'e.g. {name} = ["a", "b"]')
    return ()


def _degrees(t: Table, name: str, lo: float, hi: float, default: float | None) -> float | None:
    if not t.has(name):
        return default
    value = t.number(name, math.nan)
    if math.isnan(value):
        return default  # not a number: already reported
    t.ensure(name, lo <= value <= hi, f"must be between {lo:g} and {hi:g} degrees",
             "give decimal degrees (north and east positive)")
    return value


def _tle(t: Table, base: Path) -> TleSettings | None:
    t.require("files", 'files = ["/etc/skyferry/relay.tle"]')
    t.require("latitude", "latitude = 52.52 (decimal degrees, north positive)")
    t.require("longitude", "longitude = 13.40 (decimal degrees, east positive)")
    names = _strings(t, "files") if t.has("files") else ()
    if any("\0" in f for f in names):
        t.report("files", "a path holds a NUL character", "give the paths without \\u0000")
        names = ()
    files = tuple(base / Path(f).expanduser() for f in names)
    satellites = _strings(t, "satellites") if t.has("satellites") else ()
    lat = _degrees(t, "latitude", -90, 90, None)
    lon = _degrees(t, "longitude", -180, 180, None)
    altitude = t.number("altitude", 0.0)
    t.ensure("altitude", -500 <= altitude <= 10000, "must be between -500 and 10000 metres",
             "give the antenna's height above the WGS84 ellipsoid in metres")
    min_el = _degrees(t, "min_elevation", -5, 90, 10.0)
    mask = _mask(t)
    rate = t.rate("rate", None)
    t.positive("rate", rate, 'give the expected pass throughput, e.g. "10Mbit/s", or remove rate')
    stale = t.duration("stale_after", 14 * 86400.0)
    t.positive("stale_after", stale, 'give a duration such as "14d"')
    for f in files:
        _check_elements(t, f, satellites)
    if lat is None or lon is None or min_el is None or not files:
        return None
    return TleSettings(files=files, latitude_deg=lat, longitude_deg=lon, altitude_m=altitude,
                       satellites=satellites, min_elevation_deg=min_el, horizon_mask=mask,
                       rate_bps=rate, stale_after_s=stale)


def _check_elements(t: Table, path: Path, satellites: tuple[str, ...]) -> None:
    try:
        sets = read_elements(path)
    except WindowFileError as e:
        t.problems.append(f"{t.key('files')}: {e}")
        return
    if satellites and not select(sets, satellites):
        t.report("satellites", f"matches no satellite in {path}",
                 "use names as the file writes them (globs allowed) or catalog numbers")


def _mask(t: Table) -> tuple[tuple[float, float], ...]:
    value = t.raw("horizon_mask")
    if not t.has("horizon_mask"):
        return ()
    fix = ("write horizon_mask = [[azimuth, minimum elevation], ...] in degrees, "
           "e.g. [[0, 5], [90, 25], [180, 5]]")
    ok = isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in p)
        for p in value)
    if not ok or not value:
        t.report("horizon_mask", "must be a non-empty list of [azimuth, elevation] pairs", fix)
        return ()
    assert isinstance(value, list)
    points = tuple((float(az), float(el)) for az, el in value)
    for az, el in points:
        if not (0 <= az < 360 and -5 <= el <= 90):
            t.report("horizon_mask", f"point [{az:g}, {el:g}] is out of range",
                     "azimuth 0 to 360 (exclusive), elevation -5 to 90")
            return ()
    if len({az for az, _ in points}) != len(points):
        t.report("horizon_mask", "names an azimuth twice", "give each azimuth once")
        return ()
    return points
