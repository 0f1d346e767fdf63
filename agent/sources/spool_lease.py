"""fcntl read leases on spool files: how the daemon sees a writer that comes back.

A read lease (F_SETLEASE F_RDLCK) is refused with EAGAIN while anyone has the file open for
writing, so a file still open by its producer is not settled, whatever its mtime says. Held
while the file is sealed and until it is deleted or moved, it is broken the moment a writer
opens it: F_GETLEASE then no longer says F_RDLCK, and the file is kept and ingested again.

A broken lease is signalled with SIGIO, whose default action ends the process: leases are
only taken once `install_sigio_handler` has installed a handler (in the main thread). The
handler lets go of broken leases at once, so the writer's open() does not wait for the
kernel's lease-break-time (45 s by default) while the file is sealed: the writer's changes
are seen by the size/mtime/ctime checks after reading and before disposal.

Leases need the file's owner or CAP_LEASE; without them (EACCES), or on a file system that
has no leases (EINVAL), the spool falls back on those stat comparisons alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import signal
import threading
from enum import Enum
from types import FrameType


class Lease(Enum):
    TAKEN = "taken"
    BUSY = "busy"  # open for writing somewhere: not settled
    UNSUPPORTED = "unsupported"  # not the owner and no CAP_LEASE, or no leases here


_held: dict[int, bool] = {}  # descriptor -> lease still intact (False once let go)
_ready = False


def _on_sigio(signum: int, frame: FrameType | None) -> None:
    # Runs in the main thread between bytecodes: no locks (the interrupted code may hold one).
    for fd in tuple(_held):
        if _held.get(fd) and not _intact(fd):
            _held[fd] = False
            release(fd)


def install_sigio_handler() -> bool:
    """Make SIGIO harmless (and useful); True if leases may be taken in this process."""
    global _ready
    if _ready:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGIO, _on_sigio)
    _ready = True
    return True


def take(fd: int) -> Lease:
    """Try to take a read lease on `fd` (opened read-only)."""
    if not _ready:
        return Lease.UNSUPPORTED
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return Lease.BUSY
        if e.errno in (errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOLCK):
            return Lease.UNSUPPORTED
        raise
    _held[fd] = True
    return Lease.TAKEN


def _intact(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False


def intact(fd: int) -> bool:
    """No writer opened the file since the lease on `fd` was taken."""
    return bool(_held.get(fd)) and _intact(fd)


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def forget(fd: int) -> None:
    """Before `fd` is closed: let go of its lease."""
    if _held.pop(fd, None):
        release(fd)
