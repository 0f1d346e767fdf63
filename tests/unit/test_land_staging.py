"""land's staging area: one folder per process below work_dir, a prefix per manifest; a stage
removes its own files only; a dead process's folder goes at the next start, a live one's
stays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.cloud.land_stage import Staged, StagingArea


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_one_folder_per_process_and_a_prefix_per_stage(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    a, b = area.new_stage(), area.new_stage()
    assert a.folder == b.folder and a.folder.parent == tmp_path
    assert a.folder.name.startswith(f"land-{os.getpid()}-")
    assert a.place(3) != b.place(3) and a.place(-1) != a.place(0)
    for stage, name in ((a, a.place(0)[0]), (a, a.place(1)[0] + ".tmp"), (b, b.place(0)[0])):
        (stage.folder / name).write_bytes(b"x")
    a.abandon()  # staging stopped part-way: everything of its prefix goes
    assert sorted(os.listdir(a.folder)) == [b.place(0)[0]]  # b's file is b's
    finished = area.new_stage()  # a finished stage removes the files it lists
    path = finished.folder / finished.place(-1)[0]
    path.write_bytes(b"y")
    finished.files.append(Staged(-1, ("s", "f", "y"), path, 1, 0, "ab"))
    finished.cleanup()
    assert sorted(os.listdir(a.folder)) == [b.place(0)[0]]
    area.close()
    assert not a.folder.exists()


def test_a_dead_processes_folder_goes_a_live_ones_stays(tmp_path: Path) -> None:
    dead = tmp_path / f"land-{_dead_pid()}-0a0b0c0d"
    live = tmp_path / f"land-{os.getppid()}-01020304"  # the test runner's parent: alive
    other = tmp_path / "land-notes"  # not a pid: not ours to judge
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "s1-entry-0").write_bytes(b"left over")
    StagingArea(tmp_path).new_stage()
    assert not dead.exists()
    assert live.exists() and other.exists()
