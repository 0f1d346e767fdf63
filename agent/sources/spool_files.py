"""Opening, deleting and moving spool files relative to directory descriptors.

Nothing here takes a path by name from the root of the file system: every file is reached
from the spool root's descriptor, component by component, without following links, so
whatever a producer swaps in (a link to a file outside the spool, to the state_dir), nothing
outside the spool is read, written or deleted. A file is deleted or moved only if it is still
the one that was sealed (same device, inode, size, mtime, ctime) and, where a read lease could
be taken, no writer opened it since.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.ingest.opening import same_content, same_file
from agent.sources import spool_lease
from agent.sources.spool_lease import Lease
from agent.sources.spool_scan import ASIDE_SUFFIX, DIR_FLAGS, Candidate, open_folder

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_COPY_BLOCK = 1 << 20
_NAME_MAX = 255  # bytes in one name (Linux file systems)


def side_name(name: str, suffix: str, hidden: bool = True) -> str:
    """A name next to `name` for a moment of its life (aside, temporary, kept): `name` with
    `suffix` (and a leading dot if `hidden`) while that fits in one name; for a name close to
    the limit, as much of it as fits and a digest of the whole, so different names never
    meet. A name over the limit made every rename fail: the file stayed, ingested again at
    every restart."""
    dot = "." if hidden else ""
    whole = f"{dot}{name}{suffix}"
    if len(os.fsencode(whole)) <= _NAME_MAX:
        return whole
    digest = "~" + hashlib.blake2b(os.fsencode(name), digest_size=8).hexdigest()
    room = _NAME_MAX - len(os.fsencode(f"{dot}{digest}{suffix}"))
    head = os.fsencode(name)[:room].decode("utf-8", "ignore")  # no split character
    return f"{dot}{head}{digest}{suffix}"


class Kept(Exception):
    """A file that was accepted stays where it is; the message says why."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason


class Hold:
    """One spool file opened for ingest (the request's `opener`, called in the pipeline's
    thread): the descriptor handed to the pipeline is a duplicate; this one keeps the read
    lease, if any, until the file is disposed of or kept."""

    def __init__(self, root_fd: int, c: Candidate) -> None:
        self.root_fd = root_fd
        self.c = c
        self.fd: int | None = None
        self.busy = False  # open for writing by someone: not settled after all
        self.leased = False
        self.open_errno: int | None = None  # why the file could not be opened, if it could not
        self.opened = False

    def open(self) -> int:
        self.opened = True
        parts = self.c.parts
        try:
            parent = open_folder(self.root_fd, parts[:-1])
            try:
                fd = os.open(parts[-1], FILE_FLAGS, dir_fd=parent)
            finally:
                os.close(parent)
        except OSError as e:
            self.open_errno = e.errno
            raise
        try:
            lease = spool_lease.take(fd)
        except BaseException:
            os.close(fd)
            raise
        if lease is Lease.BUSY:
            os.close(fd)
            self.busy = True
            raise BlockingIOError(errno.EAGAIN, "still open for writing")
        if lease is Lease.UNSUPPORTED:
            return fd
        try:
            given = os.dup(fd)
        except OSError:  # out of descriptors: the lease goes with the pipeline's copy
            spool_lease.forget(fd)
            return fd
        self.close()
        self.fd, self.leased = fd, True
        return given

    def writer_came(self) -> bool:
        """A writer opened the file since its lease was taken."""
        return self.fd is not None and not spool_lease.intact(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            spool_lease.forget(self.fd)
            os.close(self.fd)
            self.fd = None


def _unchanged(parent: int, name: str, c: Candidate) -> os.stat_result:
    try:
        now = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        raise Kept("gone", "was removed by its producer after it was accepted") from None
    assert c.st is not None
    if not same_file(now, c.st):
        raise Kept("changed", "was replaced after it was accepted; the new one is ingested")
    if not same_content(now, c.st):
        raise Kept("changed", "changed after it was accepted; the new version is ingested")
    return now


def dispose(root_fd: int, c: Candidate, hold: Hold, done: DoneDir | None) -> None:
    """Delete (done None) or move into done/ the file `c` that was sealed, if unchanged.

    Raises Kept when the file stays (changed, replaced, gone, or the folder refuses).
    """
    parts = c.parts
    try:
        parent = open_folder(root_fd, parts[:-1])
    except OSError as e:
        raise Kept("folder_changed", f"its folder cannot be opened any more ({e.strerror})"
                   ) from None
    try:
        if hold.writer_came():
            raise Kept("changed", "was opened for writing while it was ingested; the new "
                       "version is ingested once it settles")
        _unchanged(parent, parts[-1], c)
        if done is None:
            _delete(parent, parts[-1], c)
        else:
            done.move(parent, c)
    finally:
        os.close(parent)


def _is_sealed(fd: int, name: str, c: Candidate) -> bool:
    assert c.st is not None
    try:
        now = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return False
    # The rename itself moved ctime: the inode, its size and mtime say it is the one checked.
    return same_file(now, c.st) and (now.st_size, now.st_mtime_ns) == (c.st.st_size,
                                                                        c.st.st_mtime_ns)


def _take(src: int, name: str, dst: int, dst_name: str, c: Candidate) -> None:
    """Rename what is at `name` to dst_name, then make sure it is the file that was sealed.

    Checking first and renaming after would leave an instant in which a producer's new
    version (or a link) renamed over the name is taken in its place; renamed first, what is
    checked is exactly what was taken. Anything else goes back, never over a newer entry.
    """
    os.rename(name, dst_name, src_dir_fd=src, dst_dir_fd=dst)
    if _is_sealed(dst, dst_name, c):
        return
    try:
        os.link(dst_name, name, src_dir_fd=dst, dst_dir_fd=src, follow_symlinks=False)
    except FileExistsError:  # yet another version came: keep this one in sight too
        os.rename(dst_name, side_name(name, f".{os.getpid()}-{time.monotonic_ns()}.kept",
                                      hidden=False), src_dir_fd=dst, dst_dir_fd=src)
    except OSError:  # no hard link to another user's file (protected_hardlinks)
        os.rename(dst_name, name, src_dir_fd=dst, dst_dir_fd=src)
    else:
        os.unlink(dst_name, dir_fd=dst)
    raise Kept("changed", "was replaced at the instant it was to go; the new one is ingested")


def _delete(parent: int, name: str, c: Candidate) -> None:
    aside = side_name(name, ASIDE_SUFFIX)  # hidden: never taken by a scan
    _try(lambda: _take(parent, name, parent, aside, c), "undeletable", "cannot be deleted")
    _try(lambda: os.unlink(aside, dir_fd=parent), "undeletable", "cannot be deleted")


def _try(fn: Callable[[], None], reason: str, what: str) -> None:
    try:
        fn()
    except OSError as e:
        raise Kept(reason, f"{what}: {e.strerror}; it stays in the spool") from None


@dataclass
class DoneDir:
    """The folder accepted files are moved into (after = "move"), opened by the daemon."""

    fd: int

    def close(self) -> None:
        os.close(self.fd)

    def _folder(self, parts: list[str]) -> int:
        fd = os.dup(self.fd)
        try:
            for part in parts:
                fd = _enter(fd, part, create=True)
        except OSError as e:
            os.close(fd)
            raise Kept("not_moved", f"done/ sub-folder {'/'.join(parts)} cannot be used: "
                       f"{e.strerror}; the file stays in the spool") from None
        return fd

    def move(self, parent: int, c: Candidate) -> None:
        parts = c.parts
        dest = self._folder(parts[:-1])
        try:
            try:
                _take(parent, parts[-1], dest, parts[-1], c)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise Kept("not_moved", f"cannot be moved to done/: {e.strerror}; it "
                               "stays in the spool") from None
                self._copy(parent, dest, parts[-1], c)
        finally:
            os.close(dest)

    def _copy(self, parent: int, dest: int, name: str, c: Candidate) -> None:
        """done/ on another file system: copy under a temporary name, rename, delete."""
        tmp = side_name(name, ".skyferry-tmp")
        src = os.open(name, FILE_FLAGS, dir_fd=parent)
        try:
            assert c.st is not None
            if not same_file(os.fstat(src), c.st):
                raise Kept("changed", "was replaced at the instant it was to go; the new one "
                           "is ingested")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o640, dir_fd=dest)
            try:
                while block := os.read(src, _COPY_BLOCK):
                    os.write(out, block)
                os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(src)
        os.rename(tmp, name, src_dir_fd=dest, dst_dir_fd=dest)
        _delete(parent, name, c)


def _enter(fd: int, name: str, create: bool) -> int:
    """The sub-folder `name` of `fd` (made if missing and `create`), never through a link;
    closes `fd`."""
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o750, dir_fd=fd)
        return os.open(name, DIR_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


def open_done(root_fd: int, root: Path, done: Path) -> DoneDir:
    """done/ for a spool: made by the daemon if missing; inside the spool it is reached from
    the spool's descriptor without following links, so a link or a file named `done` is
    refused (OSError), never followed nor overwritten. A done_dir outside the spool is the
    operator's, opened as configured."""
    try:
        rel = done.relative_to(root)
    except ValueError:
        done.mkdir(parents=True, exist_ok=True)
        return DoneDir(os.open(done, DIR_FLAGS & ~os.O_NOFOLLOW))
    fd = os.dup(root_fd)
    for part in rel.parts:
        fd = _enter(fd, part, create=True)
    return DoneDir(fd)


def take_back(root_fd: int, rel: str) -> None:
    """Put the aside file `rel` (`.NAME.skyferry-accepted`, left by a kill between the
    rename and the delete) back under NAME, so it is looked at again: the version already
    stored is recognised (same name, size and mtime) and deleted without a second object.
    Never over a file that took the name meanwhile (FileExistsError); a name shortened with
    a digest cannot be given back (ValueError)."""
    parts = rel.split("/")
    aside = parts[-1]
    name = aside[1:-len(ASIDE_SUFFIX)]
    if not name or side_name(name, ASIDE_SUFFIX) != aside or len(os.fsencode(aside)) >= 250:
        raise ValueError("its name was shortened, the original cannot be told")
    parent = open_folder(root_fd, parts[:-1])
    try:
        # link, not rename: rename would replace a file that has the name by now
        os.link(aside, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
        os.unlink(aside, dir_fd=parent)
    finally:
        os.close(parent)
