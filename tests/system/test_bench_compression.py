"""Smoke run of benchmarks/compression.py on a tiny corpus, so the benchmark does not rot.

The acceptance ratios are not asserted here (on a few MiB, file-pack and manifest overheads
weigh differently); what is asserted is that the policy decides as it should and that its
decision shows in the bytes.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks import compression
from benchmarks.run import BENCHMARKS, write_section

SIZE = 4 << 20


def test_compression_benchmark_smoke(tmp_path: Path) -> None:
    started = time.monotonic()
    r = compression.run(tmp_path, SIZE, levels="1,19+ldm")
    assert time.monotonic() - started < 30

    assert [row.label for row in r.rows] == [
        "level 1", "level 19+LDM", compression.DEFAULT_ROW, compression.AUTO_INGEST_ROW,
        compression.AUTO_LINK_ROW]
    for row in r.rows:
        assert row.run.info["bytes"] == row.plain
        assert 0.15 * row.plain < row.wire < 0.8 * row.plain
        assert row.run.wall_s > 0 and row.run.cpu_s > 0 and row.run.rss > 0
    level = {row.label: row for row in r.rows}
    assert level["level 19+LDM"].wire < level["level 1"].wire

    ingest, link = r.row(compression.AUTO_INGEST_ROW), r.row(compression.AUTO_LINK_ROW)
    assert ingest.levels() == "1" and ingest.choices[0]["regime"] == "fast"
    assert link.levels() == "19+LDM" and link.choices[0]["regime"] == "link-bound"
    assert link.choices[0]["t"] < 1.0  # decided before the first file, as the daemon's first look
    assert link.wire < 0.95 * r.row(compression.DEFAULT_ROW).wire
    # Level 1 either way: the same chunks (manifests differ by a few bytes: ids, times).
    assert abs(r.row(compression.DEFAULT_ROW).wire - ingest.wire) < 0.001 * ingest.wire

    lines = {line for line, _, _ in r.verdicts}
    assert any("default settings" in line for line in lines)
    assert any("link-bound" in line and "0.9x" in line for line in lines)

    body = compression.render(r, ["--size", "4MiB"])
    assert body.startswith("## Compression level by budget (`python -m benchmarks.compression "
                           "--size 4MiB`)")
    assert "| level 19+LDM | subset | 19+LDM |" in body
    results = tmp_path / "RESULTS.md"
    write_section(compression.SECTION, body, results)
    assert "<!-- compression -->" in results.read_text()


def test_compression_benchmark_is_registered() -> None:
    module, full, quick = BENCHMARKS["compression"]
    assert module == "benchmarks.compression"
    assert full == [] and "--size" in quick
