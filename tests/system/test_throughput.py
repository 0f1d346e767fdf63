"""Smoke version of benchmarks/backend_throughput.py (issue 3, acceptance 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kits.emulators import Emulator
from tests.kits.throughput import TARGET, measure


@pytest.mark.timing
def test_upload_fills_a_40ms_20mbit_link(moto: Emulator, tmp_path: Path) -> None:
    """A smaller payload than the benchmark's, the same link and the same 90 % target."""
    m = measure(moto, tmp_path, 24 << 20, rtt_s=0.04, cap_bps=20e6 / 8, streams=4)
    print("\n" + m.summary())
    assert m.utilisation >= TARGET, m.summary()
