"""Issue 4, acceptance 2: 24 h of passes for 100 satellites over one site in under 2 s
(the benchmark, benchmarks/windows_predict.py, records the figure in benchmarks/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.windows.elements import parse_tle_text
from tests.kits.constellation import constellation, measure

ROOT = Path(__file__).resolve().parents[2]
MARK_BEGIN = "<!-- windows_predict -->"
MARK_END = "<!-- /windows_predict -->"


def test_constellation_elements_are_valid_and_distinct() -> None:
    sets = parse_tle_text(constellation(100), "constellation.tle")  # checksums are checked
    assert len(sets) == 100
    assert len({s.line2[17:25] for s in sets}) == 100  # every plane different


@pytest.mark.timing
def test_100_satellites_24h_predicted_in_under_2s(tmp_path: Path) -> None:
    # Best of up to three: other test suites share this machine's two cores. A run under the
    # target ends the search (a slower one later cannot change the verdict).
    best, passes, windows = measure(tmp_path, 100, 24.0)
    for _ in range(2):
        if best < 2.0:
            break
        best = min(best, measure(tmp_path, 100, 24.0)[0])
    print(f"100 satellites, 24 h: {best:.2f} s, {passes} passes, {windows} windows")
    assert passes > 300  # a real amount of work: ~4-5 passes per satellite and day
    assert best < 2.0


def bench(results: Path, satellites: int) -> str:
    """`python -m benchmarks.windows_predict`, small, writing to `results`; its output line."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.windows_predict", "--satellites", str(satellites),
         "--hours", "1", "--repeat", "1", "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def test_record_touches_only_its_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nother: 1\n")
    assert bench(results, 3).startswith("3 satellites, 1 h, one site")
    bench(results, 4)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nother: 1\n")
    assert text.count(MARK_BEGIN) == 1 and text.count(MARK_END) == 1
    assert "4 satellites" in text and "3 satellites" not in text
