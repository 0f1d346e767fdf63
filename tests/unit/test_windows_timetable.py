"""Issue 4: the weekly timetable (rclone style) and acceptance 6 for timetables: every parse
error names the file (or config key), the line and the field."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config.settings import TimetableEntry
from agent.daemon.site_config import validate
from agent.errors import ConfigError
from agent.windows import WindowFileError
from agent.windows.forecast import build_forecast
from agent.windows.timetable import Timetable, load_timetable_file, parse_timetable, week_start

MON = datetime(2026, 11, 23, tzinfo=UTC).timestamp()  # a Monday, 00:00 UTC
H = 3600.0
D = 86400.0


def test_week_starts_on_monday_utc() -> None:
    assert week_start(MON) == MON
    assert week_start(MON + 6 * D + 23 * H) == MON
    assert week_start(MON - 1) == MON - 7 * D


def test_the_issue_example_opens_monday_daytime_and_the_weekend() -> None:
    tt = Timetable(parse_timetable("Mon-08:00,10Mbit/s Mon-18:00,off Sat-00:00,2Mbit/s"))
    found = [(c.start - MON, c.end - MON, c.rate_bps) for c in tt.contacts(MON, MON + 7 * D)]
    # Saturday 00:00 to Monday 08:00 is one stretch at 2 Mbit/s (it wraps round the week).
    assert found == [(0.0, 8 * H, 2e6 / 8), (8 * H, 18 * H, 10e6 / 8),
                     (5 * D, 7 * D, 2e6 / 8)]


def test_daily_entries_on_and_rate_changes() -> None:
    tt = Timetable(parse_timetable("06:00,on 12:00,1MB/s 20:00,off"))
    day = [(c.start - MON, c.end - MON, c.rate_bps) for c in tt.contacts(MON, MON + D)]
    assert day == [(6 * H, 12 * H, None), (12 * H, 20 * H, 1e6)]
    assert len(tt.contacts(MON, MON + 7 * D)) == 14


def test_timetable_and_other_sources_combine_and_rate_at_takes_the_lowest() -> None:
    settings = validate({
        "site": {"id": "s", "state_dir": "/tmp/x"},
        "keys": {"recipient_public": "a", "signing_key": "b", "dedup_key": "c"},
        "backend": {"url": "file:///tmp/cloud"},
        "windows": {"mode": "schedule", "timetable": "Mon-08:00,10Mbit/s Mon-18:00,off",
                    "intervals": [{"start": "2026-11-23T17:00:00Z",
                                   "end": "2026-11-23T19:00:00Z", "rate": "2Mbit/s"}]},
    }, Path("/c.toml")).windows
    f = build_forecast(settings, anchor=MON)
    w = f.window_at(MON + 9 * H)
    assert w is not None and (w.start, w.end) == (MON + 8 * H, MON + 19 * H)
    assert f.rate_at(MON + 9 * H) == 10e6 / 8
    assert f.rate_at(MON + 17.5 * H) == 2e6 / 8  # both open: the lower rate
    assert f.rate_at(MON + 18.5 * H) == 2e6 / 8
    assert f.next_window_start(MON + 20 * H) == MON + 7 * D + 8 * H


def test_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tt.txt"
    path.write_text("# weekdays only\nMon-08:00,on\nSat-00:00,off\n")
    tt = Timetable(path=path)
    assert len(tt.contacts(MON, MON + 7 * D)) == 1
    path.write_text("00:00,on\n")
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert tt.reload()
    assert tt.contacts(MON, MON + 7 * D)[0].duration_s == 7 * D
    path.write_text("Mon-25:00,on\n")  # broken: the previous timetable stays
    os.utime(path, ns=(time.time_ns() + 2 * 10**9,) * 2)
    with pytest.raises(WindowFileError):
        tt.reload()
    assert tt.contacts(MON, MON + 7 * D)[0].duration_s == 7 * D


BAD = [
    ("Mon-08:00,10Mbit/s\nFoo-09:00,off\n", 2, "entry 'Foo-09:00,off', field day"),
    ("# comment\n\nMon-08:00,on Tue-24:00,off\n", 3, "entry 'Tue-24:00,off', field time"),
    ("Mon-08:00,10Mbyte/s\n", 1, "entry 'Mon-08:00,10Mbyte/s', field rate"),
    ("Mon-08:00\n", 1, "entry 'Mon-08:00', field entry"),
    ("08:00,on\nWed-08:00,off\n", 2, "entry 'Wed-08:00,off', field time"),  # same moment
]


@pytest.mark.parametrize(("text", "line", "field"), BAD)
def test_timetable_file_errors_name_file_line_and_field(tmp_path: Path, text: str, line: int,
                                                        field: str) -> None:
    path = tmp_path / "timetable.txt"
    path.write_text(text)
    with pytest.raises(WindowFileError) as info:
        load_timetable_file(path)
    e = info.value
    assert (e.path, e.line, e.field) == (str(path), line, field)
    assert str(e).startswith(f"{path}:{line}: {field}: ")


def _config(windows: dict[str, Any]) -> dict[str, Any]:
    return {"site": {"id": "s", "state_dir": "/tmp/x"},
            "keys": {"recipient_public": "a", "signing_key": "b", "dedup_key": "c"},
            "backend": {"url": "file:///tmp/cloud"}, "windows": windows}


def test_config_reports_timetable_errors_with_key_and_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        validate(_config({"mode": "schedule", "timetable": "Mon-08:00,on Mon-18:61,off"}),
                 tmp_path / "c.toml")
    (problem,) = info.value.problems
    assert problem.startswith("windows.timetable: entry 'Mon-18:61,off', field time:"), problem
    path = tmp_path / "tt.txt"
    path.write_text("Mon-08:00,on\nMon-18:00,fast\n")
    with pytest.raises(ConfigError) as info:
        validate(_config({"mode": "schedule", "timetable_file": str(path)}), tmp_path / "c.toml")
    (problem,) = info.value.problems
    assert problem.startswith(
        f"windows.timetable_file: {path}:2: entry 'Mon-18:00,fast', field rate:"), problem


def test_config_reads_timetable_and_pass_margins(tmp_path: Path) -> None:
    w = validate(_config({"mode": "schedule", "timetable": "Mon-08:00,2MB/s Fri-18:00,off",
                          "pre_pass": "45s", "post_pass": "5s", "min_viable_contact": "1m"}),
                 tmp_path / "c.toml").windows
    assert w.timetable == (TimetableEntry(0, 8 * 3600, True, 2e6),
                           TimetableEntry(4, 18 * 3600, False))
    assert (w.pre_pass_s, w.post_pass_s, w.min_viable_contact_s) == (45.0, 5.0, 60.0)
