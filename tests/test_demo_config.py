"""`make demo` starts by writing a config and checking it: that config must pass the same
checks `run` applies (a new check once broke the demo at its first step, unnoticed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent import demo


def test_demo_config_passes_check_config(tmp_path: Path) -> None:
    work = tmp_path / "demo-run"
    demo.prepare_workdir(work)
    demo.skyferry("keygen", "--out", str(work / "keys"), "--site", demo.SITE)
    config = demo.write_config(work)
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
