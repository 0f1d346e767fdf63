"""Issue 4, acceptance 1 and 6 (TLE side): predicted passes against an independent scan;
the horizon mask; element files that do not parse name the file, line and field."""

from __future__ import annotations

import functools
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.config.settings import TleSettings
from agent.windows import WindowFileError
from agent.windows.elements import parse_elements, tle_checksum
from agent.windows.tle import HorizonMask, TleSource, predict_passes, satellite
from tests.kits.tle_fixtures import ISS, NOAA19, SATELLITES, SITES, STARLINK, Site

HOURS = 48
MIN_EL = 10.0
TOLERANCE_S = 2.0
# A building filling the southern sky (azimuth 91-269 deg) up to 60 deg: from Berlin, ISS and
# Starlink passes low in the south vanish, passes that reach the northern sky are trimmed.
MASK = ((90.0, 0.0), (91.0, 60.0), (269.0, 60.0), (270.0, 0.0))


def _sat(key: str) -> tuple[object, float]:
    es = parse_elements(SATELLITES[key], f"{key}.tle")[0]
    return satellite(es), float(round(es.epoch))


@functools.cache
def scan(sat_key: str, site_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Elevation and azimuth every second for 48 h from the element epoch, the plain way:
    skyfield's full Earth-orientation chain (IAU 2000B nutation, to keep 172 800 samples
    affordable), not the shortcut the predictor takes, and no event finder."""
    from skyfield.api import wgs84
    from skyfield.nutationlib import iau2000b_radians

    from agent.windows.tle import timescale

    sat, t0 = _sat(sat_key)
    site = SITES[site_key]
    ts = timescale()
    topos = wgs84.latlon(site.latitude, site.longitude, elevation_m=site.altitude_m)
    jd0 = ts.from_datetime(datetime.fromtimestamp(t0, UTC)).tt
    seconds = np.arange(0, HOURS * 3600 + 1, dtype=float)
    t = ts.tt_jd(jd0 + seconds / 86400)
    t._nutation_angles_radians = iau2000b_radians(t)
    alt, az, _ = (sat - topos).at(t).altaz()  # type: ignore[operator]
    return seconds, alt.degrees, az.degrees, t0


def _threshold(az: np.ndarray, mask: tuple[tuple[float, float], ...]) -> np.ndarray:
    if not mask:
        return np.full_like(az, MIN_EL)
    pts = sorted(mask)
    m = np.interp(az % 360, [p[0] for p in pts], [p[1] for p in pts], period=360)
    return np.maximum(MIN_EL, m)


def scanned_passes(sat_key: str, site_key: str,
                   mask: tuple[tuple[float, float], ...] = ()) -> list[tuple[float, float]]:
    """Intervals above the threshold from the 1 s scan, each crossing refined by bisection
    (full skyfield model) to a millisecond."""
    from skyfield.api import wgs84

    from agent.windows.tle import timescale

    seconds, alt, az, t0 = scan(sat_key, site_key)
    above = alt - _threshold(az, mask) >= 0
    flips = np.nonzero(above[1:] != above[:-1])[0]
    sat, _ = _sat(sat_key)
    site = SITES[site_key]
    ts = timescale()
    topos = wgs84.latlon(site.latitude, site.longitude, elevation_m=site.altitude_m)
    jd0 = ts.from_datetime(datetime.fromtimestamp(t0, UTC)).tt
    lo, hi = seconds[flips].copy(), seconds[flips + 1].copy()
    rising = ~above[flips]
    for _ in range(12):
        mid = (lo + hi) / 2
        a, z, _ = (sat - topos).at(ts.tt_jd(jd0 + mid / 86400)).altaz()  # type: ignore[operator]
        up = a.degrees - _threshold(z.degrees, mask) >= 0
        move_hi = up == rising
        hi = np.where(move_hi, mid, hi)
        lo = np.where(move_hi, lo, mid)
    crossings = (lo + hi) / 2
    out: list[tuple[float, float]] = []
    start = 0.0 if above[0] else None
    for c, r in zip(crossings, rising, strict=True):
        if r:
            start = c
        elif start is not None:
            out.append((t0 + start, t0 + c))
            start = None
    if start is not None:
        out.append((t0 + start, t0 + seconds[-1]))
    return out


def predicted(sat_key: str, site: Site, mask: tuple[tuple[float, float], ...] = ()
              ) -> list[tuple[float, float]]:
    from skyfield.api import wgs84

    sat, t0 = _sat(sat_key)
    topos = wgs84.latlon(site.latitude, site.longitude, elevation_m=site.altitude_m)
    passes = predict_passes(sat, topos, t0, t0 + HOURS * 3600, MIN_EL,
                            HorizonMask(mask) if mask else None)
    return [(p.start, p.end) for p in passes]


def worst_error(pred: list[tuple[float, float]], ref: list[tuple[float, float]]) -> float:
    assert len(pred) == len(ref), (
        f"{len(pred)} passes predicted, {len(ref)} scanned:\n{pred}\n{ref}")
    return max((max(abs(a - c), abs(b - d)) for (a, b), (c, d) in zip(pred, ref, strict=True)),
               default=0.0)


@pytest.mark.parametrize("site_key", sorted(SITES))
@pytest.mark.parametrize("sat_key", sorted(SATELLITES))
def test_aos_los_match_an_independent_scan_for_48h(sat_key: str, site_key: str) -> None:
    pred = predicted(sat_key, SITES[site_key])
    ref = scanned_passes(sat_key, site_key)
    assert len(ref) >= 3, f"the fixture should give several passes, got {ref}"
    err = worst_error(pred, ref)
    print(f"{sat_key}@{site_key}: {len(ref)} passes in 48 h, worst AOS/LOS error {err:.3f} s")
    assert err <= TOLERANCE_S


@pytest.mark.parametrize("sat_key", ["iss", "starlink"])
def test_horizon_mask_removes_and_trims_the_passes_it_should(sat_key: str) -> None:
    site_key = "berlin"
    open_sky = scanned_passes(sat_key, site_key)
    masked_ref = scanned_passes(sat_key, site_key, MASK)
    masked = predicted(sat_key, SITES[site_key], MASK)
    err = worst_error(masked, masked_ref)
    print(f"{sat_key}@{site_key} masked: {len(masked_ref)} windows, worst error {err:.3f} s")
    assert err <= TOLERANCE_S
    # Sort the open-sky passes into those the mask hides entirely and those it only trims.
    removed = [p for p in open_sky if not any(a < p[1] and b > p[0] for a, b in masked)]
    kept = [p for p in open_sky if p not in removed]
    assert removed and kept, (removed, kept)
    seconds, alt, az, t0 = scan(sat_key, site_key)
    clear = alt - _threshold(az, MASK) >= 0
    for a, b in removed:  # never above the mask anywhere in the pass
        inside = (t0 + seconds >= a) & (t0 + seconds <= b)
        assert not clear[inside].any()
    for a, b in masked:  # every masked window lies inside an open-sky pass
        assert any(c - TOLERANCE_S <= a and b <= d + TOLERANCE_S for c, d in open_sky)


def _settings(path: Path, **kw: object) -> TleSettings:
    base: dict[str, object] = dict(files=(path,), latitude_deg=52.52, longitude_deg=13.405,
                                   altitude_m=40.0)
    base.update(kw)
    return TleSettings(**base)  # type: ignore[arg-type]


def test_overlapping_passes_merge_and_short_ones_go(tmp_path: Path) -> None:
    path = tmp_path / "two.tle"
    # Two copies of the ISS a few seconds apart along the orbit: every pass overlaps.
    lines = ISS.strip().splitlines()
    twin = lines[2][:2] + "99999" + lines[2][7:43] + f"{22.2246 + 0.3:8.4f}" + lines[2][51:68]
    twin1 = lines[1][:2] + "99999" + lines[1][7:68]
    path.write_text("\n".join([
        *lines, "TWIN", twin1 + str(tle_checksum(twin1)), twin + str(tle_checksum(twin))]) + "\n")
    src = TleSource(_settings(path))
    t0 = src.element_sets[0].epoch
    windows = src.predict(t0, t0 + 86400)
    single = predicted("iss", SITES["berlin"])
    single = [p for p in single if p[0] < t0 + 86400]
    assert len(windows) == len(single)
    for w in windows:
        assert w.source == "tle" and set((w.detail or "").split(", ")) == {"ISS (ZARYA)", "TWIN"}
        assert w.max_elevation_deg is not None and w.max_elevation_deg >= MIN_EL
    shortest = min(w.duration_s for w in windows)
    src_min = TleSource(_settings(path), min_viable_s=shortest + 1)
    assert len(src_min.predict(t0, t0 + 86400)) == len(windows) - 1


def test_satellite_filter_and_several_files(tmp_path: Path) -> None:
    (tmp_path / "a.tle").write_text(ISS + NOAA19)
    (tmp_path / "b.tle").write_text(STARLINK)
    src = TleSource(_settings(tmp_path / "a.tle", files=(tmp_path / "a.tle", tmp_path / "b.tle"),
                              satellites=("NOAA*", "44714")))
    assert sorted(s.name for s in src.element_sets) == ["NOAA 19", "STARLINK-1008"]


def test_elements_are_reread_when_they_change_and_a_bad_refresh_keeps_the_last(
        tmp_path: Path) -> None:
    path = tmp_path / "relay.tle"
    path.write_text(ISS)
    src = TleSource(_settings(path))
    assert [s.name for s in src.element_sets] == ["ISS (ZARYA)"]
    assert not src.reload()  # unchanged: nothing re-read
    path.write_text(NOAA19)
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert src.reload()
    assert [s.name for s in src.element_sets] == ["NOAA 19"]
    path.write_text(NOAA19.replace("99.1559", "99.1a59"))  # a damaged refresh
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert not src.reload()
    assert [s.name for s in src.element_sets] == ["NOAA 19"]
    assert src.last_error is not None and "relay.tle:3" in src.last_error


def test_stale_elements_are_flagged(tmp_path: Path) -> None:
    path = tmp_path / "relay.tle"
    path.write_text(ISS)
    src = TleSource(_settings(path))
    epoch = src.element_sets[0].epoch
    assert src.stale(epoch + 13 * 86400) == {}
    assert list(src.stale(epoch + 15 * 86400)) == ["ISS (ZARYA)"]


# ---- acceptance 6: parse errors name the file, the line and the field ------------------------

def _damage(text: str, line: int, col: int, new: str, fix_checksum: bool = True) -> str:
    lines = text.splitlines()
    s = lines[line - 1]
    s = s[:col - 1] + new + s[col - 1 + len(new):]
    if fix_checksum and s[:2] in ("1 ", "2 ") and len(s) >= 69:
        s = s[:68] + str(tle_checksum(s))
    lines[line - 1] = s
    return "\n".join(lines) + "\n"


BAD_TLES = [
    # (description, text, line, field words)
    ("bad inclination", _damage(ISS, 3, 9, " 51.6a02"), 3, 'field "inclination" (columns 9-16)'),
    ("checksum", _damage(ISS, 2, 69, "3", fix_checksum=False), 2,
     'field "checksum" (column 69)'),
    ("epoch day", _damage(ISS, 2, 21, "x35.61844383"), 2, 'field "epoch day" (columns 21-32)'),
    ("eccentricity", _damage(ISS, 3, 27, "0.00401"), 3, 'field "eccentricity" (columns 27-33)'),
    ("mean motion", _damage(ISS, 3, 53, "99.54059185"), 3, 'field "mean motion" (columns 53-63)'),
    ("bstar", _damage(ISS, 2, 54, " 4856x-4"), 2, 'field "bstar drag term" (columns 54-61)'),
    ("short line", ISS.replace("113452", "11345"), 3, 'field "checksum" (column 69)'),
    ("no line 2", ISS.rsplit("\n", 2)[0] + "\n", 3, "line 2"),
    ("catalog mismatch", _damage(ISS, 3, 3, "25545"), 3, 'field "catalog number" (columns 3-7)'),
    ("two names", "JUNK\n" + ISS, 1, "name"),
]


@pytest.mark.parametrize(("what", "text", "line", "field"), BAD_TLES,
                         ids=[b[0] for b in BAD_TLES])
def test_tle_parse_errors_name_file_line_and_field(tmp_path: Path, what: str, text: str,
                                                   line: int, field: str) -> None:
    path = tmp_path / "relay.tle"
    path.write_text(text)
    with pytest.raises(WindowFileError) as info:
        TleSource(_settings(path))
    e = info.value
    assert (e.path, e.line) == (str(path), line), str(e)
    assert field in e.field, str(e)
    assert str(e).startswith(f"{path}:{line}: "), str(e)


def test_omm_json_and_csv_parse_and_errors_name_record_line_and_field(tmp_path: Path) -> None:
    record = {"OBJECT_NAME": "ISS (ZARYA)", "OBJECT_ID": "1998-067A",
              "EPOCH": "2018-05-15T14:50:33.547", "MEAN_MOTION": 15.54059185,
              "ECCENTRICITY": 0.0004018, "INCLINATION": 51.6402, "RA_OF_ASC_NODE": 181.0633,
              "ARG_OF_PERICENTER": 88.8954, "MEAN_ANOMALY": 22.2246, "NORAD_CAT_ID": 25544,
              "BSTAR": 4.8567e-5, "MEAN_MOTION_DOT": 2.728e-5, "MEAN_MOTION_DDOT": 0}
    good = tmp_path / "iss.json"
    good.write_text(json.dumps([record], indent=1))
    omm = TleSource(_settings(good))
    t0 = omm.element_sets[0].epoch
    assert [round(c.start) for c in omm.predict(t0, t0 + 86400)] == [
        round(a) for a, _ in predicted("iss", SITES["berlin"]) if a < t0 + 86400]
    csv = tmp_path / "iss.csv"
    csv.write_text(",".join(record) + "\n" + ",".join(str(v) for v in record.values()) + "\n")
    assert [s.name for s in TleSource(_settings(csv)).element_sets] == ["ISS (ZARYA)"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([record, {**record, "INCLINATION": "51.6x"}], indent=1))
    with pytest.raises(WindowFileError) as info:
        TleSource(_settings(bad))
    assert info.value.line is not None and info.value.line > 2
    assert "record 2, field INCLINATION" in str(info.value)
    assert str(info.value).startswith(f"{bad}:{info.value.line}: ")


async def test_daemon_upkeep_reports_stale_elements(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from agent.config.settings import WindowSettings
    from agent.obs.metrics import Metrics
    from agent.windows.forecast import build_forecast

    path = tmp_path / "relay.tle"
    path.write_text(ISS)
    f = build_forecast(WindowSettings(mode="schedule", tle=_settings(path)), anchor=0.0)
    tle = f.source(TleSource)
    assert tle is not None
    now = tle.element_sets[0].epoch + 20 * 86400
    metrics = Metrics()

    async def run_blocking(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)

    caplog.set_level("WARNING", logger="skyferry")
    task = asyncio.create_task(f.maintain(run_blocking, lambda: now, metrics))
    await asyncio.sleep(0.2)
    task.cancel()
    assert metrics.registry.get_sample_value("skyferry_tle_stale_satellites") == 1
    age = metrics.registry.get_sample_value("skyferry_tle_age_days")
    assert age is not None and abs(age - 20) < 1e-6
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "tle_stale"]
    assert "older than 14 days" in record.getMessage()
    # The passes around `now` were predicted ahead, in the background.
    lo, hi = tle.covered
    assert lo <= now and hi >= now + 48 * 3600
