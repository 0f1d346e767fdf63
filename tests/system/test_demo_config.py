"""`make demo` starts by writing a config and checking it: that config must pass the same
checks `run` applies (a new check once broke the demo at its first step, unnoticed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from demo import SITE
from demo.files import DemoFile
from demo.main import compare, make_site, prepare_workdir


def test_demo_config_passes_check_config(tmp_path: Path) -> None:
    work = tmp_path / "demo-run"
    prepare_workdir(work)
    config = make_site(work).config
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_demo_compare_ignores_the_restore_journal_but_not_strays(tmp_path: Path) -> None:
    originals, restored = tmp_path / "originals", tmp_path / "restored"
    f = DemoFile("telemetry", "a/b.csv", 3, 1_700_000_000_000_000_000, 1)
    for root in (originals / f.spool, restored / SITE / f.spool):
        (root / "a").mkdir(parents=True)
        (root / f.name).write_bytes(b"abc")
        os.utime(root / f.name, ns=(f.mtime_ns, f.mtime_ns))
    (restored / ".skyferry").mkdir()
    (restored / ".skyferry" / "restored.sqlite").write_bytes(b"journal")
    assert compare([f], originals, restored) == []
    (restored / SITE / "stray.txt").write_bytes(b"x")
    assert compare([f], originals, restored) == [
        f"{SITE}/stray.txt: restored but never sent"]
