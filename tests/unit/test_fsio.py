"""fsio.StagingFolder: a batch of new files made durable by one syncfs or by fdatasync each."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from agent.store import fsio


def _stage(tmp_path: Path, count: int) -> tuple[fsio.StagingFolder, list[str]]:
    folder = fsio.StagingFolder(tmp_path / "stage")
    names = [f"{i:064x}" for i in range(count)]
    for i, name in enumerate(names):
        with fsio.new_file(folder.path / name) as write:
            write(bytes([i]) * (1000 + i))
    return folder, names


class _Calls:
    def __init__(self) -> None:
        self.syncfs = 0
        self.fdatasync = 0


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> _Calls:
    seen = _Calls()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        seen.fdatasync += 1
        real_fdatasync(fd)

    def syncfs(fd: int) -> int:
        seen.syncfs += 1
        os.fsync(fd)  # what the test can check: the call reached a real descriptor
        return 0

    monkeypatch.setattr(fsio.os, "fdatasync", fdatasync)
    monkeypatch.setattr(fsio, "_syncfs", syncfs)
    monkeypatch.setattr(fsio, "_SYNCFS_REPORTS", True)
    return seen


def test_many_files_are_made_durable_by_one_syncfs(tmp_path: Path, calls: _Calls,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsio, "_dirty_bytes", lambda: 0)
    folder, names = _stage(tmp_path, fsio.SYNCFS_FROM + 2)
    folder.sync(names)
    folder.close()
    assert (calls.syncfs, calls.fdatasync) == (1, 0)
    for i, name in enumerate(names):
        assert (folder.path / name).read_bytes() == bytes([i]) * (1000 + i)


def test_few_files_or_much_else_dirty_are_synced_one_by_one(
        tmp_path: Path, calls: _Calls, monkeypatch: pytest.MonkeyPatch) -> None:
    few, names = _stage(tmp_path, fsio.SYNCFS_FROM - 1)
    monkeypatch.setattr(fsio, "_dirty_bytes", lambda: 0)
    few.sync(names)
    few.close()
    assert (calls.syncfs, calls.fdatasync) == (0, len(names))

    many = fsio.StagingFolder(tmp_path / "many")
    more = [f"f{i}" for i in range(fsio.SYNCFS_FROM + 4)]
    for name in more:
        fsio.write_new(many.path / name, b"x")
    # Other writers have much waiting: syncfs would wait for their data too.
    monkeypatch.setattr(fsio, "_dirty_bytes", lambda: fsio.SYNCFS_DIRTY_MAX + 1)
    many.sync(more)
    many.close()
    assert (calls.syncfs, calls.fdatasync) == (0, len(names) + len(more))


def test_a_writeback_error_reported_by_syncfs_fails_the_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_syncfs(fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(fsio, "_syncfs", failing_syncfs)
    monkeypatch.setattr(fsio, "_SYNCFS_REPORTS", True)
    monkeypatch.setattr(fsio, "_dirty_bytes", lambda: 0)
    folder, names = _stage(tmp_path, fsio.SYNCFS_FROM)
    with pytest.raises(OSError) as raised:
        folder.sync(names)
    folder.close()
    assert raised.value.errno == errno.EIO and raised.value.filename == str(folder.path)


def test_old_kernels_do_not_trust_syncfs(monkeypatch: pytest.MonkeyPatch) -> None:
    for release, trusted in (("5.4.0-150-generic", False), ("5.8.0", True),
                             ("6.18.44-fc", True), ("4.19.0", False), ("weird", False)):
        monkeypatch.setattr(fsio.os, "uname", lambda r=release: os.uname_result(
            ("Linux", "h", r, "", "x86_64")))
        assert fsio._syncfs_reports_errors() is trusted, release


def test_dirty_bytes_reads_the_kernel_counters() -> None:
    dirty = fsio._dirty_bytes()
    assert 0 <= dirty < 1 << 62  # a real figure from /proc/meminfo, not the fallback
