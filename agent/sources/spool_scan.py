"""What a spool folder holds that is ready for ingest, and how it is grouped into objects.

Apart from the spool source (agent/sources/spool.py) so a one-shot ingest (the ingest
benchmark's child) does not import the daemon's asyncio machinery to use them.

A producer owns its spool folder and may swap any file or sub-folder for a symbolic link at
any instant, so the folder is read relative to directory descriptors: each sub-folder is
opened component by component without following links, and entries are examined with
fstatat on the descriptor of the folder that holds them (scandir of a descriptor).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config.settings import ChunkingSettings

_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")
# An accepted file is renamed to `.NAME` + this just before it is deleted (spool_files.py).
ASIDE_SUFFIX = ".skyferry-accepted"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Ident = tuple[int, int]  # (st_dev, st_ino)


def is_temporary(name: str) -> bool:
    """Names producers use while writing; such files are ingested only after the rename."""
    return name.startswith(".") or name.endswith(_TEMP_SUFFIXES)


def ident(st: os.stat_result) -> Ident:
    return st.st_dev, st.st_ino


def printable(text: str) -> str:
    """`text` safe for one log line: undecodable bytes and control characters escaped."""
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in raw)


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode kept undecodable bytes as lone surrogates
        return False
    return True


@dataclass(frozen=True)
class Candidate:
    path: Path
    name: str  # relative to the spool root, POSIX separators
    size: int
    mtime_ns: int
    st: os.stat_result | None = None  # the scan's lstat (device, inode, size, mtime, ctime)

    @property
    def parts(self) -> list[str]:
        return self.name.split("/")


@dataclass(frozen=True)
class Skipped:
    """An entry the scan will not take, with why (one log line per path, not per scan)."""

    name: str  # relative to the spool root; may hold undecodable bytes: log printable(name)
    reason: str  # metric label: symlink, fifo, socket, device, bad_name, protected, unreadable
    why: str


@dataclass(frozen=True)
class Fence:
    """Where the scan must not go: folders it passes over silently (done/), by name relative
    to the root or by identity, and what it must never read (the state and key folders, the
    keys themselves), by identity, whatever name they are reached under."""

    skip_names: frozenset[str] = frozenset()
    skip: frozenset[Ident] = frozenset()
    protected: frozenset[Ident] = frozenset()


@dataclass
class ScanResult:
    files: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # Accepted files renamed aside and not deleted (the daemon was killed in between):
    # relative names of the aside files.
    asides: list[str] = field(default_factory=list)


def open_folder(root_fd: int, parts: list[str] | tuple[str, ...]) -> int:
    """A descriptor of root/parts..., each component opened without following links
    (OSError, e.g. ELOOP or ENOTDIR, if one was swapped for a link or a file)."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            sub = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


_KINDS = ((stat.S_ISLNK, "symlink", "is a symbolic link; links are never followed"),
          (stat.S_ISFIFO, "fifo", "is a FIFO; only regular files are ingested"),
          (stat.S_ISSOCK, "socket", "is a socket; only regular files are ingested"),
          (stat.S_ISCHR, "device", "is a device node; only regular files are ingested"),
          (stat.S_ISBLK, "device", "is a device node; only regular files are ingested"))


def _special(rel: str, st: os.stat_result) -> Skipped:
    for test, reason, why in _KINDS:
        if test(st.st_mode):
            return Skipped(rel, reason, why)
    return Skipped(rel, "special", "is not a regular file; only regular files are ingested")


def special_entry(st: os.stat_result) -> str:
    """Why an entry that is neither a folder nor a regular file is not taken (`skyferry put`)."""
    return _special("", st).why


# Sub-folders are opened from their parent's descriptor while it is open, and held until
# listed, at most this many at once: the most recently found (listed next, depth first)
# keep theirs, older ones give theirs up and are reopened from the root when their turn
# comes. Opening every folder from the root, component by component, made each scan
# quadratic in the depth of the tree.
_HELD_FOLDERS = 64


class _Pending:
    """Folders found and not yet listed (a stack), some with their descriptor held."""

    def __init__(self) -> None:
        self.stack: list[tuple[list[str], Ident, int | None]] = [([], (-1, -1), None)]
        self.held = 0
        self._oldest = 0  # below this index no entry holds a descriptor

    def push(self, parent: int, parts: list[str], seen: Ident) -> None:
        if self.held >= _HELD_FOLDERS:
            self._release_oldest()
        try:
            fd: int | None = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
        except OSError:  # gone, swapped for a link, refused: opened from the root, in turn
            fd = None
        self.held += fd is not None
        self.stack.append((parts, seen, fd))

    def _release_oldest(self) -> None:
        self._oldest = min(self._oldest, len(self.stack))
        while self._oldest < len(self.stack):
            parts, seen, fd = self.stack[self._oldest]
            self._oldest += 1
            if fd is not None:
                os.close(fd)
                self.stack[self._oldest - 1] = (parts, seen, None)
                self.held -= 1
                return

    def pop(self) -> tuple[list[str], Ident, int | None]:
        parts, seen, fd = self.stack.pop()
        self.held -= fd is not None
        self._oldest = min(self._oldest, len(self.stack))  # pushes go above it again
        return parts, seen, fd

    def close(self) -> None:
        for _, _, fd in self.stack:
            if fd is not None:
                os.close(fd)
        self.stack.clear()


def _list(root: Path, fd: int, prefix: str, fence: Fence, out: ScanResult,
          folders: _Pending) -> None:
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError as err:
        out.skipped.append(Skipped(prefix.rstrip("/") or ".", "unreadable",
                                   f"folder cannot be listed: {err.strerror}"))
        return
    for entry in entries:
        rel = prefix + entry.name
        if entry.name.startswith(".") or rel in fence.skip_names:
            if entry.name.endswith(ASIDE_SUFFIX) and entry.is_file(follow_symlinks=False):
                out.asides.append(rel)
            continue
        try:
            st = entry.stat(follow_symlinks=False)  # fstatat on the folder's descriptor
        except FileNotFoundError:
            continue
        except OSError as err:
            out.skipped.append(Skipped(rel, "unreadable", f"cannot be examined: {err.strerror}"))
            continue
        if _entry(root, rel, st, fence, out) and ident(st) not in fence.skip:
            folders.push(fd, [*prefix.split("/")[:-1], entry.name], ident(st))


def _entry(root: Path, rel: str, st: os.stat_result, fence: Fence, out: ScanResult) -> bool:
    """Sort one entry (not a dot name) into `out`; True if it is a folder to enter."""
    if ident(st) in fence.protected:
        out.skipped.append(Skipped(rel, "protected", "is the daemon's own state or key; "
                                   "a spool must not hold the state_dir or the keys"))
    elif stat.S_ISDIR(st.st_mode):
        return True
    elif is_temporary(rel.rsplit("/", 1)[-1]):
        pass
    elif not is_utf8(rel):
        out.skipped.append(Skipped(rel, "bad_name", "name is not valid UTF-8 and could "
                                   "never be restored; rename the file"))
    elif stat.S_ISREG(st.st_mode):
        out.files.append(Candidate(root / rel, rel, st.st_size, st.st_mtime_ns, st))
    else:
        out.skipped.append(_special(rel, st))
    return False


def scan_names(root_fd: int, root: Path, fence: Fence, names: Iterable[str]) -> ScanResult:
    """Like `scan_fd`, for the named entries only (what an inotify event named): each
    reached from the root component by component without following links, and sorted exactly
    as a scan would sort it; folders and names a scan would not enter are passed over."""
    out = ScanResult()
    for rel in sorted(set(names)):
        parts = rel.split("/")
        if any(p.startswith(".") or p in ("", "..") for p in parts) or any(
                "/".join(parts[:i]) in fence.skip_names for i in range(1, len(parts) + 1)):
            continue
        try:
            parent = open_folder(root_fd, parts[:-1])
        except OSError:
            continue  # gone or swapped for a link: the next scan looks
        try:
            if parts[:-1] and ident(os.fstat(parent)) in fence.skip | fence.protected:
                continue
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as err:
            out.skipped.append(Skipped(rel, "unreadable", f"cannot be examined: {err.strerror}"))
            continue
        finally:
            os.close(parent)
        _entry(root, rel, st, fence, out)
    out.files.sort(key=lambda c: (c.mtime_ns, c.name))
    return out


def scan_fd(root_fd: int, root: Path, fence: Fence = Fence()) -> ScanResult:
    """Regular, non-temporary files below the folder root_fd refers to, oldest first, and
    what was passed over and why (symbolic links are neither followed nor taken).

    Folders whose name starts with "." and those `fence` names are not entered. One fstatat
    per entry (scandir's entry caches it): a spool of many small files is scanned every few
    seconds. A folder that is no longer the one listed (swapped for a link or another folder
    between listing its parent and opening it) is passed over until the next scan.
    """
    out = ScanResult()
    folders = _Pending()
    try:
        while folders.stack:
            parts, expect, fd = folders.pop()
            if fd is None:
                try:
                    fd = open_folder(root_fd, parts)
                except OSError as e:  # gone or swapped for a link: looked at again next scan
                    if e.errno in (errno.EACCES, errno.EPERM):
                        out.skipped.append(Skipped("/".join(parts), "unreadable",
                                                   f"folder cannot be opened: {e.strerror}"))
                    continue
            try:
                # Opened without following links, from a folder already checked: still the
                # folder listed (not another swapped in between), or passed over.
                if parts and ident(os.fstat(fd)) != expect:
                    continue
                _list(root, fd, "".join(f"{p}/" for p in parts), fence, out, folders)
            finally:
                os.close(fd)
    finally:
        folders.close()
    out.files.sort(key=lambda c: (c.mtime_ns, c.name))
    return out


def scan(root: Path, skip: Path | None) -> list[Candidate]:
    """Regular, non-temporary files below root, oldest first (`skip`: a folder not entered).

    For one-shot use (the benchmarks); the spool source uses `scan_fd` with its own fence.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        skips: frozenset[Ident] = frozenset()
        if skip is not None:
            with contextlib.suppress(OSError):
                skips = frozenset({ident(os.stat(skip, follow_symlinks=False))})
        return scan_fd(fd, root, Fence(skip=skips)).files
    finally:
        os.close(fd)


def plan(ready: list[Candidate], chunking: ChunkingSettings | None) -> list[list[Candidate]]:
    """Group files for ingest, oldest first: each large file alone, small ones in packs.

    A pack closes at `pack_size` bytes or `pack_files` files; without chunking settings (or
    with pack_below 0) every file goes alone.
    """
    batches: list[list[Candidate]] = []
    pack: list[Candidate] = []
    pack_bytes = 0
    for c in ready:
        if chunking is None or c.size >= chunking.pack_below:
            batches.append([c])
            continue
        if pack and (pack_bytes + c.size > chunking.pack_size
                     or len(pack) >= chunking.pack_files):
            pack, pack_bytes = [], 0
        if not pack:
            batches.append(pack)  # takes its place in the order now, filled as files come
        pack.append(c)
        pack_bytes += c.size
    return batches
