"""Smoke run of benchmarks/compression.py on a tiny corpus, so the benchmark does not rot.

The acceptance ratios are not asserted here (on a few MiB, file-pack and manifest overheads
weigh differently); what is asserted is that the policy decides as it should and that its
decision shows in the bytes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.kits.bench import exit_code_for, load_report, run_benchmark

SIZE = 4 << 20
# The rows the benchmark adds after the fixed levels (benchmarks/compression.py).
DEFAULT_ROW = "default settings"
AUTO_INGEST_ROW = "auto, ingest-bound budget"
AUTO_LINK_ROW = "auto, link-bound budget"


def row_of(report: Any, label: str) -> Any:
    return next(r for r in report.rows if r.label == label)


@pytest.mark.timing
def test_compression_benchmark_smoke(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    started = time.monotonic()
    done = run_benchmark("compression", "--size", "4MiB", "--levels", "1,19+ldm",
                         "--workdir", tmp_path / "work", "--results", results,
                         "--report-json", tmp_path / "report.json", timeout=120)
    assert time.monotonic() - started < 30
    r = load_report(tmp_path / "report.json")
    assert done.returncode == exit_code_for(r.verdicts), done.stderr

    assert [row.label for row in r.rows] == [
        "level 1", "level 19+LDM", DEFAULT_ROW, AUTO_INGEST_ROW, AUTO_LINK_ROW]
    for row in r.rows:
        assert row.run.info["bytes"] == row.plain
        assert 0.15 * row.plain < row.wire < 0.8 * row.plain
        assert row.run.wall_s > 0 and row.run.cpu_s > 0 and row.run.rss > 0
    level = {row.label: row for row in r.rows}
    assert level["level 19+LDM"].wire < level["level 1"].wire

    ingest, link = row_of(r, AUTO_INGEST_ROW), row_of(r, AUTO_LINK_ROW)
    assert ingest.levels == "1" and ingest.choices[0]["regime"] == "fast"
    assert link.levels == "19+LDM" and link.choices[0]["regime"] == "link-bound"
    assert link.choices[0]["t"] < 1.0  # decided before the first file, as the daemon's first look
    assert link.wire < 0.95 * row_of(r, DEFAULT_ROW).wire
    # Level 1 either way: the same chunks (manifests differ by a few bytes: ids, times).
    assert abs(row_of(r, DEFAULT_ROW).wire - ingest.wire) < 0.001 * ingest.wire

    lines = {line for line, _, _ in r.verdicts}
    assert any("default settings" in line for line in lines)
    assert any("link-bound" in line and "0.9x" in line for line in lines)

    body = done.stdout
    assert body.startswith("## Compression level by budget (`python -m benchmarks.compression "
                           "--size 4MiB ")
    assert "| level 19+LDM | subset | 19+LDM |" in body
    written = results.read_text()
    assert "<!-- compression -->" in written and body.strip() in written


def test_compression_benchmark_is_registered() -> None:
    full = run_benchmark("run", "--list", "--only", "compression")
    quick = run_benchmark("run", "--list", "--quick", "--only", "compression")
    assert full.returncode == quick.returncode == 0, full.stderr + quick.stderr
    assert full.stdout == "compression: python -m benchmarks.compression\n"
    assert quick.stdout.startswith("compression: python -m benchmarks.compression --")
    assert "--size" in quick.stdout
