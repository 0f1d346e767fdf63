"""Config loading: the example loads, and every bad value is reported with its key and a fix."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyfastcdc import FastCDC

from agent.config.settings import ClassSettings, CycleWindow, DailyWindow, Interval
from agent.daemon.preflight import check_config_main
from agent.daemon.site_config import load_settings, validate
from agent.errors import ConfigError
from tests.kits.example import example_site

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "skyferry.toml"
MIB = 1 << 20

MINIMAL: dict[str, Any] = {
    "site": {"id": "camp-alpha", "state_dir": "/var/lib/skyferry"},
    "keys": {
        "recipient_public": "keys/recipient.pub",
        "signing_key": "keys/site.key",
        "dedup_key": "keys/dedup.key",
    },
    "backend": {"url": "file:///srv/cloud"},
}
DELETE = object()  # an override value that removes the key from MINIMAL
# `<key.path>: <what is wrong> (got <value>); <how to fix>`
PROBLEM_RE = re.compile(r"^[a-z_][\w.\[\]-]*: .+ \(got .+\); .+$")


def with_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """MINIMAL with `changes` merged in, one table level deep; DELETE removes a key."""
    data = copy.deepcopy(MINIMAL)
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            for key, value in values.items():
                if value is DELETE:
                    del data[section][key]
                else:
                    data[section][key] = value
        elif values is DELETE:
            del data[section]
        else:
            data[section] = values
    return data


def problems_of(
    data: dict[str, Any], path: Path = Path("/etc/skyferry/skyferry.toml")
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(data, path)
    assert info.value.path == str(path)
    return info.value.problems


def problem_for(problems: list[str], key: str) -> str:
    """The one problem reported for `key`."""
    found = [p for p in problems if p.startswith(f"{key}:")]
    assert len(found) == 1, f"expected one problem for {key}, got {problems}"
    return found[0]


def write(tmp_path: Path, text: str, name: str = "skyferry.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- the example file -----------------------------------------------------------------------


def test_example_file_loads() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.site.id == "camp-alpha"
    assert settings.site.state_dir == Path("/var/lib/skyferry")
    assert settings.keys.signing_key == EXAMPLE.parent / "keys" / "site.key"
    assert settings.store.quota_bytes == 50 << 30
    assert [c.name for c in settings.classes] == ["critical", "high", "normal", "bulk"]
    assert settings.class_named("bulk").ttl_s == 30 * 86400
    assert [s.name for s in settings.spools] == ["sensors", "camera"]
    assert settings.spools[1].effective_done_dir == Path("/srv/spool/camera-done")
    assert settings.put.socket == Path("/var/lib/skyferry/skyferry.sock")
    assert settings.backend.url == "file:///var/lib/skyferry-cloud"
    assert settings.windows.mode == "always"


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = [
        "id", "state_dir", "recipient_public", "signing_key", "dedup_key", "quota", "rank",
        "policy", "ttl", "min_size", "avg_size", "max_size", "level", "min_ratio",
        "name", "path", "priority", "settle", "after", "done_dir", "scan_interval", "create",
        "socket",
        "url", "streams", "aging", "retry_initial", "retry_max", "mode", "intervals", "daily",
        "cycle", "log_level", "log_format",
    ]  # fmt: skip
    missing = [k for k in keys if not re.search(rf"^#? ?{k} = ", text, re.MULTILINE)]
    assert missing == []


def test_example_schedule_windows_are_valid(tmp_path: Path) -> None:
    """The commented-out window examples load once enabled."""
    text = EXAMPLE.read_text(encoding="utf-8").replace('mode = "always"', 'mode = "schedule"')
    for key in ("intervals = [", "    { start", "]", "daily = ", "cycle = "):
        text = text.replace(f"\n# {key}", f"\n{key}")
    settings = load_settings(write(tmp_path, text))
    start = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    assert settings.windows.mode == "schedule"
    assert settings.windows.intervals == (
        Interval(start, start + timedelta(minutes=12), rate_bps=10e6 / 8),
    )
    assert settings.windows.daily == (DailyWindow(22 * 3600, 4 * 3600, rate_bps=5e6 / 8),)
    assert settings.windows.cycle == CycleWindow(open_s=15.0, closed_s=10.0)


def test_check_config_prints_ok_and_summary(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # check-config also checks what the file points at (keys, folders): the example with its
    # paths moved under tmp_path and its keys made.
    example = example_site(tmp_path / "example")
    assert check_config_main(example) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"OK: {example}"
    for word in ("camp-alpha", "sensors", "camera", "bulk", f"file://{tmp_path}/example/cloud"):
        assert word in out[1]
    assert "always" in out[1]


# --- defaults and mapping -------------------------------------------------------------------


def test_minimal_file_gets_the_defaults() -> None:
    settings = validate(MINIMAL, Path("/etc/skyferry/skyferry.toml"))
    assert settings.classes == (
        ClassSettings("critical", 0, "refuse"),
        ClassSettings("high", 1, "refuse"),
        ClassSettings("normal", 2, "evict-oldest"),
        ClassSettings("bulk", 3, "evict-oldest"),
    )
    assert settings.store.quota_bytes is None
    assert (settings.chunking.min_size, settings.chunking.avg_size) == (MIB, 4 * MIB)
    assert settings.chunking.max_size == 16 * MIB
    assert settings.put.socket == Path("/var/lib/skyferry/skyferry.sock")
    assert settings.put.priority == "normal"
    assert settings.spools == ()
    assert settings.uplink.aging_s == 6 * 3600
    assert settings.windows.mode == "always"
    assert settings.telemetry.log_level == "info"


def test_relative_paths_are_taken_from_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = with_changes(
        {
            "site": {"state_dir": "state"},
            "spool": [{"name": "logs", "path": "spool/logs", "after": "move", "done_dir": "d"}],
            "put": {"socket": "run/sf.sock"},
        }
    )
    settings = validate(data, Path("/etc/skyferry/skyferry.toml"))
    base = Path("/etc/skyferry")
    assert settings.site.state_dir == base / "state"
    assert settings.keys.dedup_key == base / "keys" / "dedup.key"
    assert settings.spools[0].path == base / "spool" / "logs"
    assert settings.spools[0].done_dir == base / "d"
    assert settings.put.socket == base / "run" / "sf.sock"


def test_units_are_converted() -> None:
    data = with_changes(
        {
            "store": {"quota": "1.5GB"},
            "chunking": {"min_size": "512KiB", "avg_size": "2MiB", "max_size": 8 * MIB},
            "compression": {"min_ratio": 1},
            "spool": [{"name": "s", "path": "/s", "settle": "250ms", "scan_interval": 3}],
            "uplink": {"aging": "1h30m", "retry_initial": "500ms", "retry_max": "2m"},
        }
    )
    settings = validate(data, Path("/c.toml"))
    assert settings.store.quota_bytes == 1_500_000_000
    assert settings.chunking.min_size == 512 << 10
    assert settings.chunking.max_size == 8 * MIB
    assert settings.compression.min_ratio == 1.0
    assert settings.spools[0].settle_s == 0.25
    assert settings.spools[0].scan_interval_s == 3.0
    assert settings.uplink.aging_s == 5400.0
    assert (settings.uplink.retry_initial_s, settings.uplink.retry_max_s) == (0.5, 120.0)


def test_classes_replace_the_defaults_and_sort_by_rank() -> None:
    data = with_changes(
        {
            "classes": {
                "bulk": {"rank": 5, "ttl": "7d"},
                "alarm": {"rank": 0, "policy": "refuse"},
                "normal": {"rank": 1},
            }
        }
    )
    classes = validate(data, Path("/c.toml")).classes
    assert classes == (
        ClassSettings("alarm", 0, "refuse"),
        ClassSettings("normal", 1, "evict-oldest"),
        ClassSettings("bulk", 5, "evict-oldest", ttl_s=7 * 86400.0),
    )


def test_windows_are_converted_to_utc_and_sorted() -> None:
    plus2 = timezone(timedelta(hours=2))
    data = with_changes(
        {
            "windows": {
                "mode": "schedule",
                "intervals": [
                    {"start": "2026-11-26T10:00:00Z", "end": "2026-11-26T10:05:00Z"},
                    {
                        "start": datetime(2026, 11, 25, 12, 0, tzinfo=plus2),
                        "end": datetime(2026, 11, 25, 12, 30, tzinfo=plus2),
                        "rate": "1MB/s",
                    },
                ],
                "daily": [{"start": "23:30:15", "end": time(0, 15)}],
            }
        }
    )
    windows = validate(data, Path("/c.toml")).windows
    first, second = windows.intervals
    assert first.start == datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    assert first.start.utcoffset() == timedelta(0)
    assert first.rate_bps == 1e6
    assert second.start == datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    assert second.rate_bps is None
    assert windows.daily == (DailyWindow(23 * 3600 + 30 * 60 + 15, 15 * 60),)


# --- bad values: each names its key and the bad value ---------------------------------------

BAD_VALUES = [
    # (changes, key path, text that must follow "got")
    ({"site": {"id": "Camp_Alpha"}}, "site.id", "'Camp_Alpha'"),
    ({"site": {"id": "-camp"}}, "site.id", "'-camp'"),
    ({"site": {"id": "a" * 64}}, "site.id", "'aaaa"),
    ({"site": {"id": 7}}, "site.id", "7"),
    ({"keys": {"signing_key": 3}}, "keys.signing_key", "3"),
    ({"keys": {"dedup_key": ""}}, "keys.dedup_key", "''"),
    ({"store": {"quota": "50 gigs"}}, "store.quota", "'50 gigs'"),
    ({"store": {"quota": "-1GiB"}}, "store.quota", "'-1GiB'"),
    ({"store": {"quota": 0}}, "store.quota", "0"),
    ({"store": {"quota": [1]}}, "store.quota", "[1]"),
    ({"classes": {"normal": {"rank": -1}}}, "classes.normal.rank", "-1"),
    ({"classes": {"normal": {"rank": "2"}}}, "classes.normal.rank", "'2'"),
    ({"classes": {"normal": {"rank": 2, "policy": "drop"}}}, "classes.normal.policy", "'drop'"),
    ({"classes": {"normal": {"rank": 2, "ttl": "forever"}}}, "classes.normal.ttl", "'forever'"),
    ({"classes": {"normal": {"rank": 2, "ttl": "0s"}}}, "classes.normal.ttl", "'0s'"),
    ({"classes": {"normal": {"rank": 0}, "Bulk": {"rank": 1}}}, "classes.Bulk", "'Bulk'"),
    ({"classes": {"normal": {"rank": 0}, "bulk": {"rank": 0}}}, "classes.bulk.rank", "0"),
    ({"classes": {"normal": 2}}, "classes.normal", "2"),
    ({"classes": {}}, "classes", "{}"),
    ({"chunking": {"min_size": "32KiB"}}, "chunking.min_size", "'32KiB'"),
    (
        {"chunking": {"min_size": "2MiB", "avg_size": "5MiB"}},
        "chunking.min_size",
        "'2MiB'",
    ),
    ({"chunking": {"avg_size": "1.5MiB"}}, "chunking.avg_size", "'1.5MiB'"),
    ({"chunking": {"avg_size": "6MiB"}}, "chunking.avg_size", "'6MiB'"),
    ({"chunking": {"max_size": "4MiB"}}, "chunking.max_size", "'4MiB'"),
    ({"chunking": {"max_size": "32MiB"}}, "chunking.max_size", "'32MiB'"),
    ({"chunking": {"max_size": "big"}}, "chunking.max_size", "'big'"),
    ({"compression": {"level": 0}}, "compression.level", "0"),
    ({"compression": {"level": 23}}, "compression.level", "23"),
    ({"compression": {"level": "3"}}, "compression.level", "'3'"),
    ({"compression": {"min_ratio": 0}}, "compression.min_ratio", "0"),
    ({"compression": {"min_ratio": 1.5}}, "compression.min_ratio", "1.5"),
    ({"compression": {"min_ratio": "0.9"}}, "compression.min_ratio", "'0.9'"),
    ({"spool": [{"name": "Sensors", "path": "/s"}]}, "spool[0].name", "'Sensors'"),
    ({"spool": [{"name": "put", "path": "/s"}]}, "spool[0].name", "'put'"),
    (
        {"spool": [{"name": "s", "path": "/s", "priority": "urgent"}]},
        "spool[0].priority",
        "'urgent'",
    ),
    ({"spool": [{"name": "s", "path": "/s", "settle": "soon"}]}, "spool[0].settle", "'soon'"),
    ({"spool": [{"name": "s", "path": "/s", "after": "copy"}]}, "spool[0].after", "'copy'"),
    ({"spool": [{"name": "s", "path": "/s", "done_dir": "/d"}]}, "spool[0].done_dir", "'/d'"),
    (
        {"spool": [{"name": "s", "path": "/s", "scan_interval": "0s"}]},
        "spool[0].scan_interval",
        "'0s'",
    ),
    (
        {"spool": [{"name": "s", "path": "/a"}, {"name": "s", "path": "/b"}]},
        "spool[1].name",
        "'s'",
    ),
    (
        {"spool": [{"name": "a", "path": "/s"}, {"name": "b", "path": "/s"}]},
        "spool[1].path",
        "'/s'",
    ),
    ({"spool": {"name": "s", "path": "/s"}}, "spool", "{'name'"),
    ({"put": {"priority": "asap"}}, "put.priority", "'asap'"),
    ({"put": {"socket": "/" + "x" * 120}}, "put.socket", "'/xxx"),
    ({"backend": {"url": "ftp://bucket/prefix"}}, "backend.url", "'ftp://bucket/prefix'"),
    ({"backend": {"url": "file://relative/dir"}}, "backend.url", "'file://relative/dir'"),
    ({"backend": {"url": "file:relative/dir"}}, "backend.url", "'file:relative/dir'"),
    ({"backend": {"url": "/srv/cloud"}}, "backend.url", "'/srv/cloud'"),
    ({"uplink": {"streams": 0}}, "uplink.streams", "0"),
    ({"uplink": {"streams": 65}}, "uplink.streams", "65"),
    ({"uplink": {"aging": "0s"}}, "uplink.aging", "'0s'"),
    ({"uplink": {"retry_initial": "0s"}}, "uplink.retry_initial", "'0s'"),
    ({"uplink": {"retry_max": "500ms"}}, "uplink.retry_max", "'500ms'"),
    ({"windows": {"mode": "sometimes"}}, "windows.mode", "'sometimes'"),
    ({"windows": {"mode": "schedule"}}, "windows.mode", "'schedule'"),
    ({"windows": {"cycle": {"open": "1s", "closed": "1s"}}}, "windows.mode", "nothing"),
    (
        {
            "windows": {
                "mode": "schedule",
                "intervals": [{"start": "2026-11-25T10:00:00", "end": "2026-11-25T11:00:00Z"}],
            }
        },
        "windows.intervals[0].start",
        "'2026-11-25T10:00:00'",
    ),
    (
        {
            "windows": {
                "mode": "schedule",
                "intervals": [{"start": datetime(2026, 11, 25, 10), "end": "2026-11-25T11:00:00Z"}],
            }
        },
        "windows.intervals[0].start",
        "2026-11-25T10:00:00",
    ),
    (
        {
            "windows": {
                "mode": "schedule",
                "intervals": [{"start": "2026-11-25T10:00:00Z", "end": "2026-11-25T10:00:00Z"}],
            }
        },
        "windows.intervals[0].end",
        "'2026-11-25T10:00:00Z'",
    ),
    (
        {
            "windows": {
                "mode": "schedule",
                "intervals": [
                    {"start": "2026-11-25T10:00:00Z", "end": "2026-11-25T11:00:00Z", "rate": "fast"}
                ],
            }
        },
        "windows.intervals[0].rate",
        "'fast'",
    ),
    (
        {
            "windows": {
                "mode": "schedule",
                "intervals": [{"start": "tomorrow", "end": "2026-11-25T11:00:00Z"}],
            }
        },
        "windows.intervals[0].start",
        "'tomorrow'",
    ),
    (
        {"windows": {"mode": "schedule", "daily": [{"start": "22:00", "end": "22:00"}]}},
        "windows.daily[0].end",
        "'22:00'",
    ),
    (
        {"windows": {"mode": "schedule", "daily": [{"start": "25:00", "end": "01:00"}]}},
        "windows.daily[0].start",
        "'25:00'",
    ),
    (
        {"windows": {"mode": "schedule", "cycle": {"open": "0s", "closed": "10s"}}},
        "windows.cycle.open",
        "'0s'",
    ),
    ({"telemetry": {"log_level": "verbose"}}, "telemetry.log_level", "'verbose'"),
    ({"telemetry": {"log_format": "xml"}}, "telemetry.log_format", "'xml'"),
]


@pytest.mark.parametrize(("changes", "key", "got"), BAD_VALUES, ids=[c[1] for c in BAD_VALUES])
def test_bad_value_names_key_and_value(changes: dict[str, Any], key: str, got: str) -> None:
    problems = problems_of(with_changes(changes))
    problem = problem_for(problems, key)
    assert f"(got {got}" in problem
    assert PROBLEM_RE.match(problem), problem
    assert len(problems) == 1, problems


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"site": {"id": DELETE}}, "site.id"),
        ({"site": {"state_dir": DELETE}}, "site.state_dir"),
        ({"keys": {"recipient_public": DELETE}}, "keys.recipient_public"),
        ({"keys": {"signing_key": DELETE}}, "keys.signing_key"),
        ({"keys": {"dedup_key": DELETE}}, "keys.dedup_key"),
        ({"backend": DELETE}, "backend.url"),
        ({"classes": {"normal": {"policy": "refuse"}}}, "classes.normal.rank"),
        ({"spool": [{"path": "/s"}]}, "spool[0].name"),
        ({"spool": [{"name": "s"}]}, "spool[0].path"),
        ({"windows": {"mode": "schedule", "cycle": {"open": "1s"}}}, "windows.cycle.closed"),
        ({"windows": {"mode": "schedule", "daily": [{"start": "01:00"}]}}, "windows.daily[0].end"),
    ],
)
def test_missing_required_key_is_named(changes: dict[str, Any], key: str) -> None:
    problems = problems_of(with_changes(changes))
    assert "required key is missing; add " in problem_for(problems, key)
    assert len(problems) == 1, problems


def test_cloud_backend_urls_are_accepted() -> None:
    for backend in ({"url": "s3://bucket/p"}, {"url": "azure://container/p", "account": "acct"},
                    {"url": "gs://bucket"}):
        assert validate(with_changes({"backend": backend}), Path("/c.toml")).backend.url == (
            backend["url"])
    problem = problem_for(problems_of(with_changes({"backend": {"url": "gcs://b/p"}})),
                          "backend.url")
    assert "gs://bucket/prefix" in problem


def test_relative_file_url_says_relative_is_not_allowed() -> None:
    problems = problems_of(with_changes({"backend": {"url": "file:cloud"}}))
    assert "relative file: path is not allowed" in problem_for(problems, "backend.url")


def test_default_priority_needs_a_matching_class() -> None:
    data = with_changes(
        {"classes": {"urgent": {"rank": 0}}, "spool": [{"name": "s", "path": "/s"}]}
    )
    problems = problems_of(data)
    assert len(problems) == 2
    for key in ("spool[0].priority", "put.priority"):
        problem = problem_for(problems, key)
        assert "'normal'" in problem
        assert "urgent" in problem


def test_chunk_sizes_that_pyfastcdc_accepts_are_allowed() -> None:
    data = with_changes(
        {"chunking": {"min_size": "64KiB", "avg_size": "256KiB", "max_size": "1MiB"}}
    )
    assert validate(data, Path("/c.toml")).chunking.avg_size == 256 << 10


@settings(max_examples=300, deadline=None)
@given(
    low=st.integers(32 << 10, 2 * MIB),
    avg=st.integers(64 << 10, 8 * MIB),
    high=st.integers(256 << 10, 20 * MIB),
)
def test_accepted_chunk_sizes_construct_the_pipeline_chunker(low: int, avg: int, high: int) -> None:
    """Whatever validation lets through, FastCDC accepts the way agent.ingest.pipeline calls it."""
    data = with_changes({"chunking": {"min_size": low, "avg_size": avg, "max_size": high}})
    try:
        chunking = validate(data, Path("/c.toml")).chunking
    except ConfigError:
        return
    FastCDC(chunking.avg_size - chunking.min_size, min_size=low, max_size=high)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[site]
id = "Camp Alpha"
state_dir = "/var/lib/skyferry"

[keys]
recipient_public = "keys/recipient.pub"
signing_key = "keys/site.key"

[store]
quota = "lots"

[[spool]]
name = "sensors"
path = "/srv/spool/sensors"
priority = "urgent"

[backend]
url = "ftp://bucket"

[uplink]
streams = 100
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    keys = [p.split(":", 1)[0] for p in info.value.problems]
    assert keys == [
        "site.id",
        "keys.dedup_key",
        "store.quota",
        "spool[0].priority",
        "backend.url",
        "uplink.streams",
    ]
    assert info.value.path == str(path)


# --- unknown keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "key", "suggestion"),
    [
        ({"spools": [{"name": "s", "path": "/s"}]}, "spools", "spool"),
        ({"site": {"idd": "x"}}, "site.idd", "id"),
        ({"uplink": {"stream": 4}}, "uplink.stream", "streams"),
        ({"spool": [{"name": "s", "path": "/s", "setle": "1s"}]}, "spool[0].setle", "settle"),
        ({"classes": {"normal": {"rank": 0, "polcy": "refuse"}}}, "classes.normal.polcy", "policy"),
        (
            {"windows": {"mode": "schedule", "cycle": {"open": "1s", "close": "1s"}}},
            "windows.cycle.close",
            "closed",
        ),
    ],
)
def test_unknown_key_suggests_the_closest(
    changes: dict[str, Any], key: str, suggestion: str
) -> None:
    problems = problems_of(with_changes(changes))
    problem = [p for p in problems if p.startswith(f"{key}: unknown key")]
    assert len(problem) == 1, problems
    assert problem[0].endswith(f"did you mean {suggestion!r}?")


def test_unknown_key_without_a_close_match_lists_the_valid_ones() -> None:
    problem = problem_for(problems_of(with_changes({"store": {"zzz": 1}})), "store.zzz")
    assert "valid keys here are quota" in problem


# --- reading the file -----------------------------------------------------------------------


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[site]\nid = "camp-alpha"\nstate_dir = /var/lib/skyferry\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    [problem] = info.value.problems
    assert problem.startswith("line 3, column 13: invalid TOML: ")
    assert "state_dir = /var/lib/skyferry" in problem


def test_toml_error_at_end_of_document_points_at_the_last_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[site]\nid = "camp-alpha"\nports = [1, 2,\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    [problem] = info.value.problems
    assert problem.startswith("line 3, ")


def test_missing_file_says_where_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    [problem] = info.value.problems
    assert str(path) in problem
    assert "skyferry check-config" in problem
    assert "config/skyferry.toml" in problem


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[site]\nid = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        load_settings(path)


def test_check_config_prints_every_problem_and_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '[site]\nid = "camp-alpha"\nstate_dir = "s"\n'
        '[keys]\nrecipient_public = "r"\nsigning_key = "s"\ndedup_key = "d"\n'
        '[backend]\nurl = "gcs://bucket"\n[uplink]\nstreams = 0\naging = "later"\n',
    )
    assert check_config_main(path) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert [line.removeprefix(f"{path}: ").split(":")[0] for line in lines] == [
        "backend.url",
        "uplink.streams",
        "uplink.aging",
    ]


def test_check_config_on_a_missing_file_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_config_main(tmp_path / "absent.toml") == 2
    assert "config file not found" in capsys.readouterr().err
