"""Log lines cannot be forged by a name: control characters escaped in text, JSON valid UTF-8."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from agent.obs.logs import JsonFormatter, TextFormatter, safe_text

# A file name a hostile producer could choose: a forged second line, a terminal escape (ESC
# and the C1 CSI), a line separator, and bytes that are not UTF-8.
HOSTILE = (b"report.csv\n12:00:00 info    skyferry stopped\x1b[2J\xc2\x9b31m\xe2\x80\xa8x\xff\xfe"
           ).decode("utf-8", "surrogateescape")
FORBIDDEN = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))] + ["\u2028", "\u2029"]


def record(name: str) -> logging.LogRecord:
    r = logging.LogRecord("skyferry.spool", logging.WARNING, __file__, 1,
                          f"could not ingest {name}", None, None)
    r.event = "ingest_failed"
    r.file = name
    return r


def test_text_lines_escape_control_characters() -> None:
    line = TextFormatter().format(record(HOSTILE))
    assert not any(c in line for c in FORBIDDEN), repr(line)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in line)
    line.encode("utf-8")  # printable as is
    assert "report.csv\\n12:00:00" in line and "\\x1b[2J" in line and "\\x9b" in line
    assert "\\u2028" in line and "x\\xff\\xfe" in line
    assert safe_text("plain name.txt") == "plain name.txt"


def test_json_lines_are_valid_utf8_and_keep_the_name_readable() -> None:
    line = JsonFormatter().format(record(HOSTILE))
    assert "\n" not in line and not any(c in line for c in FORBIDDEN)
    data = json.loads(line.encode("utf-8").decode("utf-8"))  # strict: no lone surrogates
    assert data["file"].endswith("x\\xff\\xfe")
    assert data["file"].startswith("report.csv\n12:00:00")  # JSON escapes keep the value
    assert "\x1b[2J\u009b31m\u2028" in data["file"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_hostile_name_makes_one_line_on_stdout(fmt: str) -> None:
    """Through the real handler on a pipe: one line, valid UTF-8, nothing on stderr."""
    code = ("import sys, logging\n"
            "from agent.obs.logs import setup_logging, log_event\n"
            f"setup_logging('info', {fmt!r})\n"
            "name = sys.argv[1]\n"
            "log_event(logging.getLogger('skyferry.spool'), logging.WARNING, 'ingest_failed',"
            " f'could not ingest {name}', file=name)\n")
    r = subprocess.run([sys.executable, "-c", code, os.fsencode(HOSTILE)], capture_output=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0 and r.stderr == b""
    text = r.stdout.decode("utf-8")
    assert text.count("\n") == 1 and "\x1b" not in text and "\u009b" not in text
    if fmt == "json":
        assert json.loads(text)["event"] == "ingest_failed"


def test_the_status_page_survives_a_problem_naming_a_lone_surrogate() -> None:
    """A put request may carry "\\ud800" (a valid JSON escape) as its name: its refusal is kept
    among the recent problems, which the status page renders and encodes as UTF-8; the page
    answered 500 for as long as the problem was among the last twenty."""
    from agent.obs.events import EventTap
    from agent.telemetry.snapshot import Snapshot
    from agent.telemetry.status_page import render_page

    tap = EventTap()
    logger = logging.getLogger("skyferry.test-surrogate")
    logger.addHandler(tap)
    # Not on to pytest's log capture: a report carrying a lone surrogate cannot cross to the
    # pytest-xdist controller (execnet encodes it as strict UTF-8).
    logger.propagate = False
    try:
        logger.warning("put refused: %s: name is not valid UTF-8", "\ud800\udcff\x1b[31m")
    finally:
        logger.removeHandler(tap)
    (problem,) = tap.recent_problems()
    problem["msg"].encode("utf-8")
    assert "\\ud800" in problem["msg"] and "\x1b" not in problem["msg"]
    snap = Snapshot(site="s", time=0.0, classes=(), gate_open=True, paused=False,
                    flushing=False, link_up=True, window=None, next_change=None, timeline=(),
                    quota_used=0, quota_limit=None, throughput_bps=0.0, mqtt=None,
                    problems=tuple(tap.recent_problems()))
    render_page(snap).encode("utf-8")
