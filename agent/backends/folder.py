"""The folder backend's plain files: `put_plain` and `head` done with the OS, not obstore.

obstore's LocalStore refuses attributes on put (NotImplementedError) and cannot set a file's
modification time, so a plain file is written here: to a temporary name in its own folder,
with its metadata as extended attributes (user.skyferry.<name>) and its mtime, fsynced, then
renamed over the final name. The temporary name ends in `#<digits>`, which LocalStore neither
lists nor accepts as a key, so no lister ever sees a partial file; everything else (create-only
puts, reads, listings) stays LocalStore's.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from obstore.store import LocalStore

from agent.backends.objstore import ObstoreBackend
from agent.backends.protocol import check_metadata
from agent.errors import PermanentBackendError

XATTR_PREFIX = "user.skyferry."
_STAGED_RE = re.compile(r"#\d+$")  # LocalStore's own staging names: never listed
_COPY_BYTES = 1 << 20
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)


class FolderBackend(ObstoreBackend):
    """LocalStore for everything, plus plain files with metadata (see the module's doc)."""

    def __init__(self, root: Path, url: str) -> None:
        super().__init__(LocalStore(root, mkdir=True), url, where=f"folder {root}",
                         credentials="file permissions")
        self.root = root

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if "\0" in key or any(p in ("", ".", "..") for p in parts) or _STAGED_RE.search(key):
            raise PermanentBackendError(
                f"{self.url}: {key!r} is not a valid object key (empty, '.' or '..' parts, or "
                "ending in #<digits>)", "rejected")
        return self.root.joinpath(*parts)

    async def put_plain(self, key: str, source: Path | bytes, *, metadata: Mapping[str, str],
                        mtime_ns: int | None = None) -> None:
        check_metadata(self.url, key, metadata)
        target = self._path(key)
        try:
            await asyncio.to_thread(_write_plain, target, source, metadata, mtime_ns)
        except (OverflowError, ValueError) as e:  # os.utime: a time out of the OS's range
            raise PermanentBackendError(
                f"{self.url}: put {key}: modification time {mtime_ns} ns cannot be set ({e})",
                "rejected") from None
        except OSError as e:
            if e.errno in _NO_XATTRS:
                raise PermanentBackendError(
                    f"{self.url}: put {key}: the file system under {self.root} does not keep "
                    "extended attributes (user.*), where plain files keep their metadata: use "
                    "ext4, xfs, btrfs or tmpfs", "rejected") from None
            if isinstance(e, IsADirectoryError | NotADirectoryError | FileExistsError):
                raise PermanentBackendError(
                    f"{self.url}: put {key}: a folder is where the file goes, or a file where "
                    "one of its folders goes; move it away", "conflict") from None
            raise self._fail("put", key, e) from e

    async def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        try:
            return await asyncio.to_thread(_read_head, self._path(key))
        except OSError as e:
            raise self._fail("head", key, e) from e


def _write_plain(target: Path, source: Path | bytes, metadata: Mapping[str, str],
                 mtime_ns: int | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target)
    try:
        if isinstance(source, bytes):
            _write_all(fd, source)
        else:
            with open(source, "rb") as src:
                while block := src.read(_COPY_BYTES):
                    _write_all(fd, block)
        for name, value in metadata.items():
            os.setxattr(fd, XATTR_PREFIX + name, value.encode("ascii"))
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        os.fsync(fd)
        os.rename(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    _fsync_folder(target.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view):]


def _create_temp(target: Path) -> tuple[int, Path]:
    for _ in range(8):
        tmp = target.with_name(f"{target.name}#{int.from_bytes(os.urandom(5)) % 10**12}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_head(path: Path) -> tuple[int, dict[str, str]] | None:
    """One descriptor for size and metadata, so both describe the same file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link: LocalStore would follow it, plain files never
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            names = os.listxattr(fd)
        except OSError as e:
            if e.errno in _NO_XATTRS:
                return st.st_size, {}
            raise
        metadata = {n[len(XATTR_PREFIX):]: os.getxattr(fd, n).decode("ascii", "replace")
                    for n in names if n.startswith(XATTR_PREFIX)}
        return st.st_size, metadata
    finally:
        os.close(fd)
