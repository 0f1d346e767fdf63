"""Disk room for the store: the headroom kept free for the index, the spare blocks held back
for it, and the disk-full refusals that say what, where and how to resume."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent.errors import DiskFullError
from agent.store.fsio import free_bytes

# Ingest stops while fewer bytes than this would stay free on state_dir's filesystem: the
# index (its WAL grows to ~4 MiB between checkpoints) and the uplink's bookkeeping must still
# be written on a full disk, since recording uploads is what frees space again.
DISK_HEADROOM_BYTES = 4 << 20
# Checked again just before an object's commit: promotion only renames, but a rename can
# need a new directory block, and failing after the commit is the case to avoid.
COMMIT_ROOM_BYTES = 256 << 10
# Blocks held back for the index (state_dir/index.sqlite-spare), for when another program
# has taken the headroom: given up to open the index on a full disk and when the uplink
# cannot record an upload (recording uploads is what frees space); taken again once there is
# room.
SPARE_BYTES = 1 << 20


def spare_path(state_dir: Path) -> Path:
    return state_dir / "index.sqlite-spare"


def keep_spare(state_dir: Path) -> bool:
    """Hold SPARE_BYTES of real blocks (see SPARE_BYTES) if there is room for them besides
    the headroom; True when it was made now."""
    spare = spare_path(state_dir)
    if spare.exists() or free_bytes(state_dir) < DISK_HEADROOM_BYTES + SPARE_BYTES:
        return False
    try:
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, SPARE_BYTES)
        finally:
            os.close(fd)
    except OSError:
        spare.unlink(missing_ok=True)
        return False
    return True


def give_up_spare(state_dir: Path) -> None:
    """The index cannot be written for lack of room: free the spare blocks."""
    with contextlib.suppress(OSError):
        spare_path(state_dir).unlink()


def check_disk_room(state_dir: Path, reserved: int, need: int) -> None:
    """Refuse while the filesystem, not the quota, is what is full (a quota set above the
    disk's size, or other data on the same disk)."""
    free = free_bytes(state_dir)
    if keep_spare(state_dir):  # given up on a full disk: there is room again
        free = free_bytes(state_dir)
    # Reservations in progress may not be written yet: count them as if they were not.
    if free - reserved - need < DISK_HEADROOM_BYTES:
        raise DiskFullError(disk_full_message(
            state_dir, f"{free} bytes free, {reserved} reserved by ingests in progress, "
            f"{need} needed and {DISK_HEADROOM_BYTES} kept free for the index"))


def disk_full_message(state_dir: Path, what: str) -> str:
    return (f"the disk holding state_dir {state_dir} is full ({what}); the data "
            "stays at its source and ingest resumes by itself as uploads free space; to "
            "resume sooner, free space on that filesystem or grow it, and keep store.quota "
            "below its size")


def disk_full_error(state_dir: Path, e: BaseException) -> DiskFullError:
    """The error to raise for an ENOSPC or SQLITE_FULL met while writing the store."""
    if isinstance(e, OSError):
        what = f"{e.strerror or e} writing {e.filename or state_dir}"
    else:
        what = f"{e} writing {state_dir / 'index.sqlite'}"
    return DiskFullError(disk_full_message(state_dir, what))
