"""Issue 4: `skyferry windows` (table, --json, --svg) and the window lines of `skyferry status`,
from config and store without a daemon; check-config names bad element files by line."""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.kits.site import Site
from tests.kits.tle_fixtures import BERLIN, ISS, NOAA19, with_epoch


def tle_site(make_site: Callable[..., Site], tle: Path, **windows: Any) -> Site:
    return make_site(extra={
        "windows": {"mode": "schedule",
                    "tle": {"files": [str(tle)], "latitude": BERLIN.latitude,
                            "longitude": BERLIN.longitude, "altitude": BERLIN.altitude_m,
                            "min_elevation": 10.0, "rate": "2MB/s"},
                    "link": {"probe": "none"}, **windows},
    })


def test_windows_lists_passes_as_json_table_and_svg(make_site: Callable[..., Site],
                                                    tmp_path: Path) -> None:
    tle = tmp_path / "relay.tle"
    now = datetime.now(UTC)
    tle.write_text(with_epoch(ISS, now) + with_epoch(NOAA19, now))
    site = tle_site(make_site, tle)
    # Something queued (no daemon: `put` writes into the store itself) for the planned drain.
    payload = tmp_path / "survey.bin"
    payload.write_bytes(random.Random(2).randbytes(3 << 20))
    site.cli("put", "-c", str(site.config), str(payload), "--priority", "bulk")

    rows = json.loads(site.cli("windows", "-c", str(site.config), "--json").stdout)
    assert isinstance(rows, list) and len(rows) >= 4
    for r in rows:
        start = datetime.fromisoformat(r["start"])
        end = datetime.fromisoformat(r["end"])
        assert start.tzinfo is not None and r["start"].endswith("Z")
        assert now - timedelta(hours=1) < start < end < now + timedelta(hours=25)
        assert r["source"] == "tle" and r["max_elevation_deg"] >= 10
        assert r["expected_bytes"] == int(r["duration_s"] * 2e6) or abs(
            r["expected_bytes"] - r["duration_s"] * 2e6) <= 2e6 * 0.1
        assert set(r["satellites"].split(", ")) <= {"ISS (ZARYA)", "NOAA 19"}
    planned = sum(sum(r["planned_bytes"].values()) for r in rows)
    assert planned == 3 << 20 and set(rows[0]["planned_bytes"]) == {"bulk"}

    longer = json.loads(site.cli("windows", "-c", str(site.config), "--json", "--hours",
                                 "48").stdout)
    assert len(longer) > len(rows)

    svg = tmp_path / "timeline.svg"
    out = site.cli("windows", "-c", str(site.config), "--svg", str(svg)).stdout
    assert "max el" in out and "tle" in out and f"timeline written to {svg}" in out
    root = ET.fromstring(svg.read_text())
    rects = root.findall(".//{http://www.w3.org/2000/svg}rect")
    assert len(rects) >= 1 + len(rows) + 1  # background, windows, the bulk drain
    assert "bulk" in svg.read_text()


def test_status_shows_current_and_next_window(make_site: Callable[..., Site],
                                              tmp_path: Path) -> None:
    tle = tmp_path / "relay.tle"
    tle.write_text(with_epoch(ISS, datetime.now(UTC)))
    site = tle_site(make_site, tle)
    site.cli("put", "-c", str(site.config), str(tle))  # creates the store
    gate = site.status()["gate"]
    nxt = gate["next_window"]
    assert nxt is not None and nxt["source"] == "tle" and nxt["max_elevation_deg"] >= 10
    assert gate["window_open"] == (gate["current_window"] is not None)
    text = site.cli("status", "-c", str(site.config)).stdout
    # A second run predicts again: the same pass, to within a second.
    assert f"next window: {nxt['start'][:16]}" in text and "current window:" in text


def test_stale_elements_warn_in_windows(make_site: Callable[..., Site], tmp_path: Path) -> None:
    tle = tmp_path / "relay.tle"
    tle.write_text(with_epoch(ISS, datetime.now(UTC) - timedelta(days=20)))
    site = tle_site(make_site, tle)
    out = site.cli("windows", "-c", str(site.config)).stdout
    assert "warning: elements of ISS (ZARYA) are 20.0 days old" in out


def test_timetable_windows_without_any_store(make_site: Callable[..., Site]) -> None:
    site = make_site(extra={"windows": {"mode": "schedule", "timetable": "00:00,on 06:00,off",
                                        "link": {"probe": "none"}}})
    rows = json.loads(site.cli("windows", "-c", str(site.config), "--json").stdout)
    assert [r["source"] for r in rows] in (["timetable"], ["timetable", "timetable"])
    assert all(r["duration_s"] <= 6 * 3600 for r in rows)


def test_check_config_names_the_bad_element_line(make_site: Callable[..., Site],
                                                 tmp_path: Path) -> None:
    tle = tmp_path / "relay.tle"
    tle.write_text(ISS.replace(" 51.6402 ", " 51.64O2 "))
    site = make_site()
    text = site.config.read_text() + (
        f'[windows]\nmode = "schedule"\n[windows.tle]\nfiles = ["{tle}"]\n'
        f"latitude = 52.5\nlongitude = 13.4\n")
    site.config.write_text(text)
    r = site.cli("check-config", str(site.config), check=False)
    assert r.returncode == 2
    assert (f'windows.tle.files: {tle}:3: line 2, field "inclination" (columns 9-16): '
            "not a valid value (got ' 51.64O2')") in r.stderr
