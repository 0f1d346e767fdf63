"""Hostile spool inputs (issue 13): a sloppy producer, a careless operator, a hostile local
user. The daemon never stops for a spool file, logs one line per path, ingests everything
else, and reads, writes and deletes nothing outside its spool folders.

The daemon runs as root without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER (setpriv):
the kernel then refuses it files and folders by their modes exactly as it refuses a service
user (root bypasses them otherwise; the venv's interpreter lives under /root, out of reach of
an unprivileged uid).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kits.site import Site, drop_file, tree_digest, wait_for

MakeSite = Callable[..., Site]
NO_DAC = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--")
OLD_ATIME = 1_500_000_000
BAD_NAME = b"bad-\xff\x1b[31m.txt"
BAD_SHOWN = "bad-\\xff\\x1b[31m.txt"
# What stays in the spool "files" (folders included) once everything else is ingested.
REMAINING = {"secret-small.txt", "secret-large.bin", os.fsdecode(BAD_NAME), "link-out", "pipe",
             "sock", "ro", "ro/kept.txt", "sub", "locked", "locked/x.txt"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to run a daemon without DAC caps")


def daemon_has_open(pid: int, path: Path) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd_dir / fd) == str(path):
                return True
        except OSError:
            continue
    return False


def while_ingested(site: Site, path: Path, data: bytes, act: Callable[[Path], None],
                   tries: int = 4) -> Path:
    """Drop `data` at path and call `act` while the daemon has the file open (mid-ingest);
    returns the path it was done to (another name if the daemon was too quick)."""
    assert site.proc is not None
    for attempt in range(tries):
        name = path if attempt == 0 else path.with_name(f"{path.stem}-{attempt}{path.suffix}")
        drop_file(path.parent, name.name, data + bytes([attempt]))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and name.exists():
            if daemon_has_open(site.proc.pid, name):
                act(name)
                return name
            time.sleep(0.0005)
        assert site.proc.poll() is None, site.log_tail()
    raise AssertionError(f"never caught the daemon reading {path.name}")


def spool_config(site: Site) -> list[dict[str, Any]]:
    return [{"name": "files", "path": str(site.spool("files")), "settle": "0.3s",
             "scan_interval": "0.1s"},
            {"name": "moved", "path": str(site.spool("moved")), "settle": "0.3s",
             "scan_interval": "0.1s", "after": "move"}]


def skipped_lines(site: Site) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in site.log_events():
        if e.get("event") == "spool_skipped":
            out.setdefault(f"{e['source']}:{e['file']}", []).append(e)
    return out


def metric_counts(site: Site) -> dict[tuple[str, str], float]:
    """(source, reason) -> skyferry_spool_skipped_total, from the metrics endpoint."""
    url = f"http://127.0.0.1:{site.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("skyferry_spool_skipped_total{"):
            labels, value = line.rsplit(" ", 1)
            kv = dict(part.split("=", 1) for part in labels[labels.index("{") + 1:-1].split(","))
            out[(kv["source"].strip('"'), kv["reason"].strip('"'))] = float(value)
    return out


class HeldWriter(threading.Thread):
    """A producer that writes, keeps the file open past `settle`, then appends and closes."""

    def __init__(self, path: Path, first: bytes, second: bytes, pause: float) -> None:
        super().__init__(daemon=True)
        self.path, self.first, self.second, self.pause = path, first, second, pause

    def run(self) -> None:
        with open(self.path, "wb") as f:
            f.write(self.first)
            f.flush()
            time.sleep(self.pause)
            f.write(self.second)


def make_hostile(files: Path, moved: Path, outside: Path) -> dict[str, bytes]:
    """The static hostile entries; returns what must stay byte-identical in place."""
    rng = random.Random(13)
    stay: dict[str, bytes] = {}
    for name, size in (("secret-small.txt", 1000), ("secret-large.bin", 2 << 20)):
        data = rng.randbytes(size)
        (files / name).write_bytes(data)
        (files / name).chmod(0)
        stay[name] = data
    (files / os.fsdecode(BAD_NAME)).write_bytes(b"bad name")
    (outside / "target.txt").write_bytes(b"OUTSIDE")
    os.utime(outside / "target.txt", (OLD_ATIME, OLD_ATIME + 1))  # relatime: a read moves it
    (files / "link-out").symlink_to(outside / "target.txt")
    os.mkfifo(files / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(files / "sock"))
    sock.close()
    (files / "ro").mkdir()
    stay["ro/kept.txt"] = b"accepted, but its folder is read-only\n" * 10
    (files / "ro" / "kept.txt").write_bytes(stay["ro/kept.txt"])
    (files / "ro").chmod(0o555)
    (files / "locked").mkdir()
    stay["locked/x.txt"] = b"in a folder the daemon cannot open"
    (files / "locked" / "x.txt").write_bytes(stay["locked/x.txt"])
    (files / "locked").chmod(0)
    (moved / "done").write_bytes(b"I am a file named done")
    stay["moved:done"] = b"I am a file named done"
    return stay


def mid_ingest_changes(site: Site, files: Path, rng: random.Random
                       ) -> tuple[str, str, bytes]:
    """A large file deleted, and another appended to, while the daemon reads them; returns
    (deleted name, appended name, the appended file's final content)."""
    big = rng.randbytes(48 << 20)
    vanished = while_ingested(site, files / "vanish.bin", big, lambda p: p.unlink())
    opened_in: list[float] = []

    def append(path: Path) -> None:
        t0 = time.monotonic()
        with open(path, "ab") as f:  # breaks the daemon's read lease: SIGIO
            opened_in.append(time.monotonic() - t0)
            f.write(b"APPENDED")

    appended = while_ingested(site, files / "append-mid.bin", big, append)
    assert opened_in[0] < 10, "the writer waited for the lease to time out"
    return vanished.name, appended.name, appended.read_bytes()


def check_lines(site: Site, lines: dict[str, list[dict[str, Any]]],
                counts: dict[tuple[str, str], float], expect: dict[str, str | None]) -> None:
    """One line per path (with its reason), counted; the log valid UTF-8 JSON, no traceback."""
    for key, reason in expect.items():
        got = lines.get(key, [])
        assert len(got) == 1, (key, got)
        if reason is not None:
            assert got[0]["reason"] == reason, (key, got)
            assert counts.get((key.split(":")[0], reason), 0) >= 1, (key, counts)
    assert set(lines) == set(expect), sorted(set(lines) - set(expect))
    raw = site.log_path.read_bytes()
    raw.decode("utf-8")  # every line valid UTF-8, whatever the file names
    assert b"Traceback" not in raw and b"Logging error" not in raw
    for line in raw.splitlines():
        if line.startswith(b"{"):
            json.loads(line)


def test_hostile_inputs_to_a_running_daemon(make_site: MakeSite, tmp_path: Path) -> None:
    site = make_site(spools={"files": "normal", "moved": "normal"})
    site.extra = {"spool": spool_config(site)}
    site.write_config()
    files, moved, outside = site.spool("files"), site.spool("moved"), tmp_path / "outside"
    outside.mkdir()
    stay = make_hostile(files, moved, outside)
    rng = random.Random(7)
    good = {"a.txt": b"hello\n" * 300, "sub/b.csv": b"t,v\n1,2\n" * 400,
            "big.bin": rng.randbytes(3 << 20)}
    for name, data in good.items():
        drop_file(files, name, data)
    drop_file(moved, "m.txt", b"moved spool data\n" * 50)
    growing = b"first part\n" * 1000 + b"appended after a pause longer than settle\n"

    def settled() -> bool:
        left = {p.relative_to(files).as_posix() for p in files.rglob("*")}
        return (left == REMAINING and site.status()["queued_objects"] == 0
                and {p.name for p in moved.iterdir()} == {"done", "m.txt"})

    site.start(wrap=NO_DAC)
    try:
        writer = HeldWriter(files / "growing.log", growing[:11000], growing[11000:], pause=2.0)
        writer.start()
        vanished, appended, final = mid_ingest_changes(site, files, rng)
        writer.join(10)
        wait_for(settled, 60, "the spool to settle", site)
        time.sleep(1.5)  # 15 more scans: nothing is logged again
        assert site.proc is not None and site.proc.poll() is None
        lines, counts = skipped_lines(site), metric_counts(site)
        # Stopped before the folders are opened again: an ingested file whose folder turns
        # writable is deleted at the next scan, as it should be.
        assert site.stop() == 0
    finally:
        (files / "ro").chmod(0o755)
        (files / "locked").chmod(0o755)
    check_lines(site, lines, counts, {
        "files:secret-small.txt": "unreadable", "files:secret-large.bin": "unreadable",
        f"files:{BAD_SHOWN}": "bad_name", "files:link-out": "symlink", "files:pipe": "fifo",
        "files:sock": "socket", "files:ro/kept.txt": "undeletable", "files:locked": "unreadable",
        "moved:done": "done_refused", "moved:m.txt": "not_moved",
        f"files:{appended}": "changed", f"files:{vanished}": None})

    # Left in place, untouched; nothing outside the spool read or changed.
    for name, data in stay.items():
        path = moved / "done" if name == "moved:done" else files / name
        path.chmod(0o600)
        assert path.read_bytes() == data, name
    assert (outside / "target.txt").stat().st_atime == OLD_ATIME, "read through the link"
    assert (outside / "target.txt").read_bytes() == b"OUTSIDE"
    assert stat.S_ISFIFO((files / "pipe").lstat().st_mode)

    out = tmp_path / "restored"
    site.restore(out)
    got = tree_digest(out / site.site_id / "files")
    got.pop(vanished, None)  # read whole before it went, or refused: either is right
    assert final.endswith(b"APPENDED")
    assert got == tree_digest_of(tmp_path / "want", {
        **good, "ro/kept.txt": stay["ro/kept.txt"], "growing.log": growing, appended: final})
    assert tree_digest(out / site.site_id / "moved") == tree_digest_of(
        tmp_path / "want-moved", {"m.txt": b"moved spool data\n" * 50})


def tree_digest_of(root: Path, files: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return tree_digest(root)
