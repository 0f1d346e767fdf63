"""A small filesystem of its own for a test or benchmark to fill: ext4 on a loop device, else a
size-capped tmpfs. Needs root; SmallFsUnavailable says why not."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agent.store.fsio import free_bytes

MiB = 1 << 20


class SmallFsUnavailable(Exception):
    """Neither a loop-device ext4 nor a tmpfs could be mounted (not root, no loop devices)."""


def _run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise OSError(f"{' '.join(cmd)} exited {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip()


class SmallFs:
    """A small filesystem mounted at `mountpoint`: ext4 on a loop device (preferred: it has
    the ENOSPC behaviour of real edge storage for fsync, directories and SQLite), else a
    size-capped tmpfs. Always `close()` it: unmounts and detaches the loop device."""

    def __init__(self, mountpoint: Path, size: int, kind: str = "auto",
                 image_dir: Path | None = None) -> None:
        self.mountpoint = mountpoint
        self.size = size
        self.wanted = kind
        self.image = (image_dir or mountpoint.parent) / f".{mountpoint.name}.ext4.img"
        self.kind = ""
        self.device: str | None = None
        self.fallback_reason: str | None = None
        self.mounted = False

    def __enter__(self) -> SmallFs:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mount(self) -> None:
        if os.geteuid() != 0:
            raise SmallFsUnavailable("mounting a small filesystem needs root (mount, losetup)")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.wanted in ("auto", "ext4"):
            try:
                self._mount_ext4()
                return
            except OSError as e:
                self._undo_ext4()
                if self.wanted == "ext4":
                    raise SmallFsUnavailable(f"ext4 on a loop device: {e}") from None
                self.fallback_reason = f"ext4 on a loop device failed ({e}); tmpfs used instead"
        try:
            _run("mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs",
                 str(self.mountpoint))
        except OSError as e:
            raise SmallFsUnavailable(f"tmpfs: {e}") from None
        self.kind, self.mounted = "tmpfs", True

    def _mount_ext4(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        # -m 0: no blocks reserved for root (the trial runs as root and must see ENOSPC).
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", str(self.image))
        self.device = _run("losetup", "--find", "--show", str(self.image))
        _run("mount", "-t", "ext4", self.device, str(self.mountpoint))
        self.kind, self.mounted = "ext4", True

    def _undo_ext4(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.mountpoint)], capture_output=True, timeout=60)
            self.mounted = False
        if self.device is not None:
            subprocess.run(["losetup", "-d", self.device], capture_output=True, timeout=60)
            self.device = None
        self.image.unlink(missing_ok=True)

    def grow(self, size: int) -> None:
        """Give the filesystem more room while it is mounted (space returns)."""
        if self.kind == "ext4":
            assert self.device is not None
            with open(self.image, "r+b") as f:
                f.truncate(size)
            _run("losetup", "-c", self.device)
            _run("resize2fs", self.device)
        else:
            _run("mount", "-o", f"remount,size={size}", str(self.mountpoint))
        self.size = size

    def free(self) -> int:
        return free_bytes(self.mountpoint)

    def total(self) -> int:
        st = os.statvfs(self.mountpoint)
        return st.f_blocks * st.f_frsize

    def close(self) -> None:
        if self.mounted:
            r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, timeout=60)
            if r.returncode != 0:  # something still holds it: detach it lazily
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True,
                               timeout=60)
            self.mounted = False
        if self.kind == "ext4":
            self._undo_ext4()

    def describe(self) -> str:
        what = ("ext4 on a loop device" if self.kind == "ext4" else "size-capped tmpfs")
        return f"{what}, {self.size / MiB:.0f} MiB"
