"""Opening a source file for ingest: never a file swapped in under the same name, never through
a symbolic link, never a FIFO that would block; and telling whether it changed while read."""

from __future__ import annotations

import errno
import os
import stat

from agent.errors import SourceError, SourceUnsettledError, UnsafePathError
from agent.format.manifest import validate_name
from agent.ingest.requests import IngestRequest

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# A spool takes the file again by itself once it settles; a put must be sent again.
NOT_STORED = ("it was not stored: a spool file is taken once it stops changing, a "
              "`skyferry put` must be run again then")
CHANGED_WHILE_READ = f"changed while it was being read; {NOT_STORED}"


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def same_content(a: os.stat_result, b: os.stat_result) -> bool:
    """Nothing suggests the file was written between the two: same size, mtime and ctime."""
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def stat_source(req: IngestRequest) -> os.stat_result:
    """The status of the regular file a request names, its name checked as restorable."""
    try:
        validate_name(req.name)
    except UnsafePathError as e:
        raise SourceError(f"{req.path}: {e}; such a name could never be restored — "
                          "rename the file") from None
    if req.seen is not None:
        st = req.seen
    else:
        try:
            st = os.stat(req.path, follow_symlinks=False)
        except FileNotFoundError:
            raise SourceError(f"{req.path} disappeared before it could be ingested") from None
        except OSError as e:
            raise SourceError(f"{req.path} could not be examined: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{req.path} is not a regular file; only regular files are ingested")
    return st


def open_source(req: IngestRequest, seen: os.stat_result) -> int:
    """A descriptor of the file `seen` describes, or SourceError: never a file swapped in
    under the same name, never through a symbolic link, never a FIFO that would block."""
    try:
        fd = req.opener() if req.opener is not None else os.open(req.path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise SourceError(f"{req.path} disappeared before it could be read") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SourceError(f"{req.path} is a symbolic link; links are not followed") from None
        raise SourceError(f"{req.path} could not be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not same_file(st, seen):
            raise SourceError(f"{req.path} was replaced by another file before it could be "
                              "read; the new one is looked at again")
        if not same_content(st, seen):
            # Still there and written to since it was looked at: not settled yet. Deleted
            # (no link left): it went away, which its source is told about.
            error = SourceUnsettledError if st.st_nlink else SourceError
            raise error(f"{req.path} changed before it could be read; {NOT_STORED}")
    except BaseException:
        os.close(fd)
        raise
    return fd
