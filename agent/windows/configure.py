"""The [windows] keys of issue 4, read for agent/config/reader.py: timetable, tle, link, pass
margins.

Kept apart from agent/config/reader.py so the window sources own their configuration; `t` is
agent.config.reader's `Table` (the problem list and key paths come with it), so every problem reads
like the rest: `<key.path>: <what is wrong> (got <value>); <how to fix>`. Element and timetable
files are parsed here too, so `skyferry check-config` names a bad file, line and field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.settings import LinkSettings, TleSettings
from agent.windows import WindowFileError
from agent.windows.linkmonitor import parse_probe
from agent.windows.timetable import load_timetable_file, parse_timetable

if TYPE_CHECKING:
    from agent.config.table import Table

EXTRA_KEYS = ("timetable", "timetable_file", "tle", "link", "pre_pass", "post_pass",
              "min_viable_contact")
# Keys that configure windows: with mode = "always" they would be ignored.
SOURCE_KEYS = ("timetable", "timetable_file", "tle")
TLE_KEYS = ("files", "satellites", "latitude", "longitude", "altitude", "min_elevation",
            "horizon_mask", "rate", "stale_after")
LINK_KEYS = ("probe", "probe_interval", "probe_timeout", "down_after", "up_after", "learn")


def read_extras(t: Table, base: Path) -> dict[str, Any]:
    """Keyword arguments for WindowSettings beyond mode/intervals/daily/cycle."""
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
    if t.has("tle"):
        out["tle"] = _tle(t.table("tle", TLE_KEYS), base)
    if t.has("link"):
        out["link"] = _link(t.table("link", LINK_KEYS))
    for key, field in (("pre_pass", "pre_pass_s"), ("post_pass", "post_pass_s"),
                       ("min_viable_contact", "min_viable_contact_s")):
        value = t.duration(key, None)
        if value is not None:
            out[field] = value
    return out


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
    from agent.windows.tle import read_elements, select

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
