"""The folder backend's plain files: `put_plain` and `head` done with the OS, not obstore.

obstore's LocalStore refuses attributes on put (NotImplementedError) and cannot set a file's
modification time, so a plain file is written here: to a temporary name in its own folder,
with its metadata as extended attributes (user.skyferry.<name>) and its mtime, fsynced, then
renamed over the final name. The temporary name is `.#<digits>`: short whatever the final
name's length; of the form LocalStore neither lists nor accepts as a key (a file name whose
first `#` is followed by digits only), so no lister of ours ever sees a partial file; and hidden,
so one left by a killed process is skipped by `ls` and by the data tools that read a landing
folder (Spark and Auto Loader ignore names starting with `.` or `_`). Everything else
(create-only puts, reads, listings) stays LocalStore's.

A plain file's own name may be of that form too (`log#1`, a name the edge took from a site's
folder): plain files are written and read here, never through LocalStore. Keys LocalStore must
read back (create-only puts, records) keep its rule.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from obstore.store import LocalStore

from agent.backends.objstore import ObstoreBackend
from agent.backends.protocol import PlainPut, Tagged, check_metadata
from agent.errors import ObjectTooLargeError, PermanentBackendError

XATTR_PREFIX = "user.skyferry."
_UNLISTED_RE = re.compile(r"^[^#]*#[0-9]+$")  # file names LocalStore neither lists nor takes
_COPY_BYTES = 1 << 20
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)
_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


class FolderBackend(ObstoreBackend):
    """LocalStore for everything, plus plain files with metadata (see the module's doc)."""

    def __init__(self, root: Path, url: str) -> None:
        super().__init__(LocalStore(root, mkdir=True), url, where=f"folder {root}",
                         credentials="file permissions")
        self.root = root

    def _path(self, key: str, plain: bool = False) -> Path:
        """The file of `key`; a `plain` file's name may be one LocalStore does not take."""
        parts = key.split("/")
        if ("\0" in key or any(p in ("", ".", "..") for p in parts)
                or (not plain and _UNLISTED_RE.match(parts[-1]))):
            raise PermanentBackendError(
                f"{self.url}: {key!r} is not a valid object key (empty, '.' or '..' parts, or "
                "a name of the form <text>#<digits>)", "rejected")
        return self.root.joinpath(*parts)

    async def put_plain(self, key: str, source: Path | bytes, *, metadata: Mapping[str, str],
                        mtime_ns: int | None = None, consume: bool = False) -> None:
        check_metadata(self.url, key, metadata)
        target = self._path(key, plain=True)
        try:
            await asyncio.to_thread(_write_plain, target, source, metadata, mtime_ns, consume)
        except (OverflowError, ValueError, OSError) as e:
            raise self._put_failed(key, mtime_ns, e) from e

    async def put_if_absent(self, key: str, data: bytes, probe_first: bool = False) -> bool:
        """As LocalStore's create-only put (a temporary name, then a hard link to the key,
        nothing synced), in one thread call: no obstore round trips, no read-back of what this
        process's own kernel just wrote (a landing pass writes four such objects per
        manifest)."""
        target = self._path(key)
        try:
            created = await asyncio.to_thread(_create_only, target, data)
        except OSError as e:
            raise self._put_failed(key, None, e) from e
        if not created:
            await self._check_existing(key, len(data))
        return created

    async def put_plain_guarded(
            self, puts: Sequence[PlainPut],
            admit: Callable[[PlainPut, Mapping[str, str] | None], bool]) -> list[bool]:
        """`GuardedPut`: one thread call for the batch; each file's folder is locked only to
        read what the name holds, judge it and rename (the module's doc)."""
        for put in puts:
            check_metadata(self.url, put.key, put.metadata)
        targets = [self._path(put.key, plain=True) for put in puts]
        try:
            return await asyncio.to_thread(_put_all_guarded, targets, puts, admit)
        except _PutFailed as e:
            put = puts[e.index]
            raise self._put_failed(put.key, put.mtime_ns, e.error) from e.error

    async def make_durable(self, keys: Iterable[str]) -> None:
        paths = [self._path(k, plain=True) for k in keys]
        try:
            await asyncio.to_thread(_sync_all, paths)
        except OSError as e:
            raise self._fail("sync", str(e.filename or self.root), e) from e

    def _put_failed(self, key: str, mtime_ns: int | None, e: Exception) -> Exception:
        if isinstance(e, OverflowError | ValueError):  # os.utime: a time out of the OS's range
            return PermanentBackendError(
                f"{self.url}: put {key}: modification time {mtime_ns} ns cannot be set ({e})",
                "rejected")
        assert isinstance(e, OSError)
        if e.errno in _NO_XATTRS:
            return PermanentBackendError(
                f"{self.url}: put {key}: the file system under {self.root} does not keep "
                "extended attributes (user.*), where plain files keep their metadata: use "
                "ext4, xfs, btrfs or tmpfs", "rejected")
        if e.errno in (errno.ENAMETOOLONG, errno.EILSEQ):  # the same on every try
            return PermanentBackendError(
                f"{self.url}: put {key}: the file system under {self.root} does not take this "
                f"name ({e.strerror}); land onto one that does, or rename it at the site",
                "rejected")
        if isinstance(e, IsADirectoryError | NotADirectoryError | FileExistsError):
            return PermanentBackendError(
                f"{self.url}: put {key}: a folder is where the file goes, or a file where "
                "one of its folders goes; move it away", "conflict")
        return self._fail("put", key, e)

    async def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        try:
            return await asyncio.to_thread(_read_head, self._path(key, plain=True))
        except OSError as e:
            raise self._fail("head", key, e) from e

    async def get_tagged(self, key: str, max_size: int | None = None) -> Tagged | None:
        try:
            found = await asyncio.to_thread(_read_tagged, self._path(key), max_size)
        except OSError as e:
            raise self._fail("get", key, e) from e
        if isinstance(found, int):
            raise ObjectTooLargeError(f"{key} is {found} bytes, more than the {max_size} "
                                      "allowed there: not read")
        return found

    async def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        """LocalStore has no conditional overwrite: the compare and the rename happen under
        an exclusive flock of the object's folder (every writer of this backend takes it;
        local file systems only: NFS locks are advisory at best)."""
        target = self._path(key)
        try:
            return await asyncio.to_thread(_swap, target, data, etag)
        except OSError as e:
            raise self._fail("put", key, e) from e


def _tag(st: os.stat_result) -> str:
    """A version: a rename makes a new inode, so a replaced file never shows an old tag."""
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _read_tagged(path: Path, max_size: int | None) -> Tagged | int | None:
    """The bytes and tag of one file (one descriptor), its size when over `max_size`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if max_size is not None and st.st_size > max_size:
            return st.st_size
        return Tagged(f.read(), _tag(st))


def _swap(target: Path, data: bytes, etag: str | None) -> bool:
    """Compare and swap: the new file is written and fsynced aside first, then the folder is
    locked only to compare the tag and rename (writers of other names in the folder are not
    held up behind an fsync)."""
    target.parent.mkdir(parents=True, exist_ok=True)

    def unchanged() -> bool:
        try:
            return _tag(os.lstat(target)) == etag
        except FileNotFoundError:
            return etag is None

    if not _rename_if(_staged(target, data, {}, None), target, unchanged):
        return False
    _fsync_folder(target.parent)
    return True


def _rename_if(staged: Path, target: Path, judge: Callable[[], bool]) -> bool:
    """Under an exclusive flock of the target's folder (every compare-and-swap and guarded
    put there takes it): `judge()`, and if True rename `staged` over `target`. Not renamed,
    `staged` is removed."""
    renamed = False
    try:
        folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            if judge():
                os.rename(staged, target)
                renamed = True
        finally:
            os.close(folder)  # releases the lock
    finally:
        if not renamed:
            os.unlink(staged)
    return renamed


def _write_plain(target: Path, source: Path | bytes, metadata: Mapping[str, str],
                 mtime_ns: int | None, consume: bool = False) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staged(target, source, metadata, mtime_ns, consume)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_folder(target.parent)


class _PutFailed(Exception):
    def __init__(self, index: int, error: OverflowError | ValueError | OSError) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error


def _put_all_guarded(targets: list[Path], puts: Sequence[PlainPut],
                     admit: Callable[[PlainPut, Mapping[str, str] | None], bool]) -> list[bool]:
    """Each in turn, then what was put synced (a failure leaves the rest undone: the caller
    does the whole batch again)."""
    done: list[bool] = []
    for i, (target, put) in enumerate(zip(targets, puts, strict=True)):
        try:
            done.append(_put_guarded(target, put.source, put.metadata, put.mtime_ns,
                                     lambda held: admit(put, held)))  # noqa: B023 (called now)
        except (OverflowError, ValueError, OSError) as e:
            raise _PutFailed(i, e) from e
    _sync_all([t for t, d in zip(targets, done, strict=True) if d])
    return done


def _put_guarded(target: Path, source: Path, metadata: Mapping[str, str], mtime_ns: int | None,
                 admit: Callable[[Mapping[str, str] | None], bool]) -> bool:
    """The file is made aside first (not synced: `_sync_all` does, for the batch); then what
    the name holds is read, judged and replaced under its folder's lock (`_rename_if`)."""
    target.parent.mkdir(parents=True, exist_ok=True)

    def admitted() -> bool:
        held = _read_head(target)
        return admit(held[1] if held is not None else None)

    staged = _staged(target, source, metadata, mtime_ns, consume=True, durable=False)
    return _rename_if(staged, target, admitted)


def _create_only(target: Path, data: bytes) -> bool:
    """False when something is already under the name (the caller compares it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target, follow_symlinks=False)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def _sync_all(paths: list[Path]) -> None:
    """fsync each file, then each of their folders once (a file already replaced by a newer
    one is that one's writer's to sync; a missing one has nothing to keep)."""
    folders: dict[Path, None] = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders[path.parent] = None
    for folder in folders:
        _fsync_folder(folder)


def _staged(target: Path, source: Path | bytes, metadata: Mapping[str, str],
            mtime_ns: int | None, consume: bool = False, durable: bool = True) -> Path:
    """The file's content, metadata and mtime in a temporary name beside `target`, fsynced
    unless not `durable`. A source the caller gives away (`consume`) on the same file system
    is linked, not copied.
    """
    linked = _linked(target, source) if consume and isinstance(source, Path) else None
    fd, tmp = linked or _create_temp(target)
    try:
        if linked is not None:
            os.fchmod(fd, 0o666 & ~_UMASK)  # as a file created here would be
        elif isinstance(source, bytes):
            _write_all(fd, source)
        else:
            with open(source, "rb") as src:
                while block := src.read(_COPY_BYTES):
                    _write_all(fd, block)
        for name, value in metadata.items():
            os.setxattr(fd, XATTR_PREFIX + name, value.encode("ascii"))
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        if durable:
            os.fsync(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return tmp


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view):]


def _linked(target: Path, source: Path) -> tuple[int, Path] | None:
    """`source` hard-linked at a temporary name beside `target`, opened; None where the file
    systems differ or links are refused (then it is copied)."""
    for _ in range(8):
        tmp = _temp_beside(target)
        try:
            os.link(source, tmp, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                return None
            raise
        try:
            return os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC), tmp
        except BaseException:
            os.unlink(tmp)
            raise
    return None


def _temp_beside(target: Path) -> Path:
    """A temporary name in target's folder: `.#<12 digits>`, hidden, unlisted by LocalStore,
    and short (a final name of up to 255 bytes, NAME_MAX, leaves no room for a suffix)."""
    return target.with_name(f".#{int.from_bytes(os.urandom(5)) % 10**12:012d}")


def _create_temp(target: Path) -> tuple[int, Path]:
    for _ in range(8):
        tmp = _temp_beside(target)
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
