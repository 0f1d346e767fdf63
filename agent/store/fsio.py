"""Durable file primitives: write to a temporary name, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

# ENOSPC: the filesystem is full; EDQUOT: the user's disk quota is; EFBIG is not (one file).
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None
_syncfs: Any = None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    _syncfs = _libc.syncfs
    _syncfs.argtypes = (ctypes.c_int,)
except (OSError, AttributeError):  # not Linux/glibc: fdatasync alone still makes it durable
    _sync_file_range = _syncfs = None
# From this many files on, one syncfs (one journal commit) beats a fdatasync per file, as
# long as little else waits to be written: syncfs would wait for other writers' data too.
SYNCFS_FROM = 8
SYNCFS_DIRTY_MAX = 128 << 20


def _dirty_bytes() -> int:
    """Bytes the whole system has waiting to be written (Dirty + Writeback), or a lot."""
    try:
        with open("/proc/meminfo", "rb") as f:
            info = f.read()
    except OSError:
        return 1 << 62
    total = 0
    for line in info.splitlines():
        if line.startswith((b"Dirty:", b"Writeback:")):
            total += int(line.split()[1]) * 1024
    return total


_IOV_MAX = 1024  # most buffers one writev takes (Linux)


def _write_all(fd: int, parts: Iterable[bytes | memoryview]) -> None:
    """Write all of `parts`, in order, with as few system calls as the kernel allows."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


@contextlib.contextmanager
def new_file(path: Path) -> Iterator[Callable[..., None]]:
    """Create `path` (it must not exist); yields a function that appends its arguments (bytes
    or memoryviews) to it, all in one system call where it can.

    Not yet durable: on leaving, writeback starts (no waiting) and the caller makes a batch of
    such files durable at once (`StagingFolder.sync`), by which time the disk has mostly caught
    up, so sealing and disk writes overlap. On failure the file is removed: nothing half-written is
    left behind.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(*parts: bytes | memoryview) -> None:
        _write_all(fd, parts)

    try:
        yield write
        if _sync_file_range is not None:
            _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # start writeback, don't wait
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def write_new(path: Path, *parts: bytes | memoryview) -> None:
    """`new_file` with all its bytes at hand."""
    with new_file(path) as write:
        write(*parts)


def _syncfs_reports_errors() -> bool:
    """Linux 5.8 and later report writeback errors through syncfs; before, it returns 0."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


_SYNCFS_REPORTS = _syncfs is not None and _syncfs_reports_errors()


class StagingFolder:
    """A new folder of files written by `new_file`, made durable together (`sync`).

    Its descriptor is opened before anything is written in it, so a syncfs through it reports
    every writeback error on the filesystem from then on: whichever thread's file failed,
    the error reaches every object staged meanwhile, not only the first to ask.
    """

    def __init__(self, path: Path) -> None:
        path.mkdir()
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def sync(self, names: Iterable[str]) -> None:
        """Make the named files and the folder's entries durable.

        Many files at once: one syncfs of their filesystem (one journal commit, not one per
        file), when the kernel reports writeback errors through it and little else waits to
        be written (syncfs would wait for other writers' data too). Otherwise, fdatasync each.
        """
        assert self._fd is not None, "sync after close"
        names = list(names)
        if (_SYNCFS_REPORTS and len(names) >= SYNCFS_FROM
                and _dirty_bytes() <= SYNCFS_DIRTY_MAX):
            if _syncfs(self._fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(self.path))
        else:
            for name in names:
                fd = os.open(self.path / name, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_durable(path: Path, *parts: bytes | memoryview, sync_dir: bool = True) -> None:
    """Atomically replace `path` with the parts joined; after return they survive a power cut.

    On failure (a full disk, most often) the temporary file is removed: nothing half-written
    is left behind, and its blocks go back to the filesystem at once.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, parts)
        os.fsync(fd)
    except BaseException as e:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename is None:  # os.write/fsync name no file
            raise OSError(e.errno, e.strerror, str(tmp)) from e
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def is_disk_full(e: BaseException) -> bool:
    """True for a write refused because the filesystem (or the user's disk quota) is full."""
    if isinstance(e, OSError):
        return e.errno in _FULL_ERRNOS
    if isinstance(e, sqlite3.OperationalError):
        # SQLITE_FULL: "database or disk is full"; an I/O error with ENOSPC underneath
        # surfaces as SQLITE_IOERR_WRITE/FSYNC, which SQLite does not tell apart.
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "database or disk is full" in str(e))
    return False


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
