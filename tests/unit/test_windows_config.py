"""Issue 4: the new [windows] keys ([windows.tle], [windows.link], pass margins) are read,
defaulted and every mistake is named by its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config.settings import LinkSettings
from agent.daemon.site_config import validate
from agent.errors import ConfigError
from tests.kits.tle_fixtures import ISS


def _config(windows: dict[str, Any]) -> dict[str, Any]:
    return {"site": {"id": "s", "state_dir": "/tmp/x"},
            "keys": {"recipient_public": "a", "signing_key": "b", "dedup_key": "c"},
            "backend": {"url": "file:///tmp/cloud"}, "windows": windows}


def problems(windows: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(_config(windows), tmp_path / "c.toml")
    return info.value.problems


def test_tle_and_link_are_read_with_units_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "relay.tle").write_text(ISS)
    w = validate(_config({
        "mode": "schedule",
        "tle": {"files": "relay.tle", "latitude": 52.5, "longitude": 13.4, "altitude": 40,
                "min_elevation": 15, "horizon_mask": [[0, 5], [180, 20]], "rate": "8Mbit/s",
                "satellites": ["ISS*"], "stale_after": "7d"},
        "link": {"probe": "tcp://10.1.1.1:443", "probe_interval": "2s", "probe_timeout": "500ms",
                 "down_after": 3, "up_after": 1, "learn": False},
    }), tmp_path / "c.toml").windows
    assert w.tle is not None
    assert w.tle.files == (tmp_path / "relay.tle",)
    assert (w.tle.latitude_deg, w.tle.longitude_deg, w.tle.altitude_m) == (52.5, 13.4, 40.0)
    assert w.tle.min_elevation_deg == 15 and w.tle.horizon_mask == ((0, 5), (180, 20))
    assert w.tle.rate_bps == 1e6 and w.tle.satellites == ("ISS*",)
    assert w.tle.stale_after_s == 7 * 86400
    assert w.link == LinkSettings("tcp://10.1.1.1:443", 2.0, 0.5, 3, 1, False)


def test_defaults_without_the_new_keys(tmp_path: Path) -> None:
    w = validate(_config({"mode": "always"}), tmp_path / "c.toml").windows
    assert w.link == LinkSettings()
    assert (w.pre_pass_s, w.post_pass_s, w.min_viable_contact_s) == (30.0, 0.0, 0.0)
    assert w.tle is None and w.timetable == () and w.timetable_file is None


@pytest.mark.parametrize(("windows", "key"), [
    ({"mode": "schedule", "tle": {"files": ["relay.tle"], "latitude": 95, "longitude": 0}},
     "windows.tle.latitude"),
    ({"mode": "schedule", "tle": {"files": ["relay.tle"], "longitude": 0}},
     "windows.tle.latitude"),
    ({"mode": "schedule", "tle": {"files": ["relay.tle"], "latitude": 0, "longitude": 0,
                                  "horizon_mask": [[0, 5], [400, 5]]}},
     "windows.tle.horizon_mask"),
    ({"mode": "schedule", "tle": {"files": ["relay.tle"], "latitude": 0, "longitude": 0,
                                  "satellites": ["NOAA*"]}},
     "windows.tle.satellites"),
    ({"mode": "schedule", "tle": {"files": ["missing.tle"], "latitude": 0, "longitude": 0}},
     "windows.tle.files"),
    ({"mode": "schedule", "tle": {"files": ["relay.tle"], "latitude": 0, "longitude": 0,
                                  "elevation": 10}},
     "windows.tle.elevation"),
    ({"mode": "always", "tle": {"files": ["relay.tle"], "latitude": 0, "longitude": 0}},
     "windows.mode"),
    ({"link": {"probe": "ftp://x"}}, "windows.link.probe"),
    ({"link": {"probe_interval": "1s", "probe_timeout": "2s"}}, "windows.link.probe_timeout"),
    ({"link": {"down_after": 0}}, "windows.link.down_after"),
    ({"link": {"learn": "yes"}}, "windows.link.learn"),
    ({"post_pass": "-1s"}, "windows.post_pass"),
    ({"mode": "schedule", "timetable": "Mon-08:00,on", "timetable_file": "tt.txt"},
     "windows.timetable_file"),
])
def test_mistakes_are_named_by_key(tmp_path: Path, windows: dict[str, Any], key: str) -> None:
    (tmp_path / "relay.tle").write_text(ISS)
    (tmp_path / "tt.txt").write_text("Mon-08:00,on\n")
    found = problems(windows, tmp_path)
    assert any(p.startswith(f"{key}:") for p in found), found
