"""Writing restored files below a target folder through directory descriptors.

Every folder on the way is opened relative to its parent's descriptor with O_NOFOLLOW, so a
symbolic link planted anywhere below the target (at a folder, at the final name, at any
temporary name) never leads a write outside it. A file is first an anonymous O_TMPFILE (or,
where the filesystem has none, a random name created O_EXCL|O_NOFOLLOW), given a random
exclusive name only once whole and verified, then renamed over its final name: no name an
object can carry can be, or meet, a temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from agent.errors import RestoreError, UnsafePathError
from agent.format.manifest import TEMP_PREFIX

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROC_FD = "/proc/self/fd"
_TRIES = 8
T = TypeVar("T")


class PathConflictError(RestoreError):
    """A file is where a folder must go, or a folder where a file must go."""


def _temp_name() -> str:
    return TEMP_PREFIX + secrets.token_hex(16)


def _classify(parent: int, part: str, shown: str, e: OSError) -> RestoreError | OSError:
    """What an open of `part` below `parent` that failed with `e` means, for the report."""
    try:
        st = os.stat(part, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return e
    if stat.S_ISLNK(st.st_mode):
        return UnsafePathError(f"{shown} is a symbolic link: restore never writes outside its "
                               "target through a link")
    if not stat.S_ISDIR(st.st_mode):
        return PathConflictError(f"{shown} is a file, not a folder (another restored file or "
                                 "something already in the target has that name)")
    return e


class TargetDir:
    """The restore target, held open; folders below it are opened one component at a time."""

    def __init__(self, root: Path, durable: bool = True) -> None:
        self.root = root
        self.durable = durable  # False: scratch files (land's staging), never fsynced
        try:
            root.mkdir(parents=True, exist_ok=True)  # the target itself is the operator's choice
            self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise RestoreError(f"cannot restore into {root}: {e.strerror}; give a folder "
                               "(it is created if missing) with --to") from None
        self.tmpfile = os.path.isdir(_PROC_FD)  # O_TMPFILE files are linked via /proc

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> TargetDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_folder(self, parts: Sequence[str]) -> int:
        """A descriptor of <root>/<parts...>, created as needed, never reached through a link."""
        fd = os.dup(self.fd)
        try:
            for i, part in enumerate(parts):
                child = self._child(fd, part, "/".join(parts[:i + 1]))
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _child(self, parent: int, part: str, shown: str) -> int:
        for _ in range(_TRIES):
            try:
                return os.open(part, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                # Made meanwhile: open it (or find out what it is) on the next turn.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=parent)
            except OSError as e:
                raise _classify(parent, part, shown, e) from None
        raise RestoreError(f"{shown}: the folder keeps disappearing while it is created")

    def new_file(self, parts: Sequence[str]) -> NewFile:
        """A file to write at <root>/<parts...>, invisible until `NewFile.commit`."""
        folder = self.open_folder(parts[:-1])
        try:
            return NewFile(folder, parts[-1], "/".join(parts), self.tmpfile, self.durable)
        except BaseException:
            os.close(folder)
            raise


class NewFile:
    """A file being written in an open folder; `commit` puts it in place, `discard` removes it."""

    def __init__(self, folder: int, name: str, shown: str, tmpfile: bool,
                 durable: bool = True) -> None:
        self.folder, self.name, self.shown, self.durable = folder, name, shown, durable
        self.tmp: str | None = None  # the temporary name, once the file has one
        self.fd = -1
        if tmpfile:
            try:
                self.fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o666,
                                  dir_fd=folder)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
        if self.fd < 0:
            self.fd, self.tmp = self._exclusive(lambda n: os.open(
                n, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                dir_fd=folder))

    def _exclusive(self, make: Callable[[str], T]) -> tuple[T, str]:
        for _ in range(_TRIES):
            name = _temp_name()
            try:
                return make(name), name
            except FileExistsError:
                continue
        raise RestoreError(f"{self.shown}: no free temporary name after {_TRIES} tries")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            view = view[os.write(self.fd, view):]

    def commit(self, mtime_ns: int) -> None:
        """fsync, set the times, and put the file at its name; on failure nothing is left."""
        try:
            if self.durable:
                os.fsync(self.fd)
            try:
                os.utime(self.fd, ns=(mtime_ns, mtime_ns))
            except (OverflowError, ValueError, OSError) as e:
                raise RestoreError(f"{self.shown}: modification time {mtime_ns} ns cannot be "
                                   f"set ({e}): not restored") from None
            if self.tmp is None:
                _, self.tmp = self._exclusive(lambda n: os.link(
                    f"{_PROC_FD}/{self.fd}", n, dst_dir_fd=self.folder, follow_symlinks=True))
            self._check_final()
            os.rename(self.tmp, self.name, src_dir_fd=self.folder, dst_dir_fd=self.folder)
            self.tmp = None
        except IsADirectoryError:
            raise PathConflictError(f"{self.shown} is a folder, not a file (another restored "
                                    "file or something already in the target is below it)"
                                    ) from None
        finally:
            self.discard()

    def _check_final(self) -> None:
        """Refuse (and report) a link or folder at the final name. Safety does not rest on
        this check: a link planted after it is replaced by the rename, never followed."""
        try:
            st = os.stat(self.name, dir_fd=self.folder, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{self.shown} is a symbolic link: restore never writes "
                                  "outside its target through a link")
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(self.shown)

    def discard(self) -> None:
        """Close and remove whatever is left; safe to call more than once."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp, dir_fd=self.folder)
            self.tmp = None
        if self.folder >= 0:
            os.close(self.folder)
            self.folder = -1
