"""Disk-full trial: the store's own disk fills during ingest (issue 6, acceptance 4).

The state directory is put on a small filesystem of its own (ext4 on a loop device; a
size-capped tmpfs when loop devices are not available, with the reason printed) and the
store's quota is set far above its size, so the disk, not the quota, is what fills. A real
daemon (tests/kits/site.py) then runs these phases on one site:

1. fill: more spool data than fits is dropped while the contact window is closed. Expected: a
   clear refusal (one warning that names the disk, state_dir and what to do; the refusal
   metrics), the files that were not accepted untouched in the spool, the daemon still up,
   no log spam while it retries, and a consistent store (PRAGMA integrity_check; every chunk
   and manifest the index holds present with its recorded size and hash; nothing half-written).
2. mid-file: the filesystem grows (space returns: ingest must resume by itself); when the
   first chunks of a large file are staged the daemon is paused (SIGSTOP), another process
   fills the disk to the last block, and the daemon resumes: ENOSPC in the middle of the file.
   Expected: a refusal, nothing left in staging, the file untouched in its spool.
3. drain on a full disk: with that other process still holding the disk, the window opens
   (SIGHUP with mode = "always"). Uploads must still be recorded, their local copies deleted,
   and ingest must resume by itself as that frees space; then the other process lets go.
4. end: everything dropped is committed in the cloud; `restore` yields every file
   byte-identical, `verify` is clean, the index holds one committed object per file.

And one in-process trial on a store of its own: the disk fills in the middle of the SQLite
commit of an object (the pre-commit room check switched off, the WAL truncated so the commit
must grow it). Expected: a DiskFullError, no row, nothing staged left, the same Store still
usable, and the same ingest succeeding once space returns.

    python -m benchmarks.disk_full [--size 64MiB] [--fs auto|ext4|tmpfs] [--workdir DIR]
                                   [--no-write] [--keep]

Needs root (mount, losetup). Prints the figures; writes the `disk_full` section of
benchmarks/RESULTS.md unless --no-write; exits 1 when a check failed or mounting was impossible.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import blake3

from agent.config.settings import ChunkingSettings, ClassSettings, CompressionSettings
from agent.config.units import parse_size
from agent.errors import DiskFullError
from agent.format.keys import generate_keys, load_edge_keys
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest
from agent.sources.spool_report import REFUSED_BACKOFF_MAX_S
from agent.sources.spool_scan import scan
from agent.store import room
from agent.store.records import StagedObject
from agent.store.room import DISK_HEADROOM_BYTES, SPARE_BYTES
from agent.store.store import Store
from benchmarks.run import add_output_options, write_report, write_section
from tests.kits.site import Site, drop_file, tree_digest
from tests.kits.smallfs import SmallFs, SmallFsUnavailable

MiB = 1 << 20
SPOOL = "files"
SMALL_CHUNKING = {"min_size": "256KiB", "avg_size": "1MiB", "max_size": "2MiB"}
QUOTA = "1GiB"  # far above the filesystem: the disk fills, not the quota


class Ballast:
    """Another program's data on the same disk: takes every free block, gives it back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes = 0

    def fill(self, limit: int | None = None) -> int:
        """Write until the filesystem refuses (ENOSPC), down to 512-byte pieces, or until
        `limit` bytes were written; returns the total."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        todo = limit if limit is not None else 1 << 62
        try:
            for piece in (4 * MiB, 256 << 10, 4096, 512):
                block = b"\xa5" * piece
                while todo > 0:
                    try:
                        n = os.write(fd, block[:todo])
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
                    self.bytes += n
                    todo -= n
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)
        return self.bytes

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.bytes = 0


# ---- what the trial drops ---------------------------------------------------------------------


@dataclass(frozen=True)
class DroppedFile:
    name: str
    data: bytes
    mtime_ns: int

    @property
    def digest(self) -> tuple[int, str]:
        return len(self.data), blake3.blake3(self.data).hexdigest()


def make_files(rng: random.Random, total: int, fs_size: int) -> list[DroppedFile]:
    """Incompressible data (what is stored is what is dropped), ~`total` bytes: small files
    (packed together), 1-4 MiB files and two large ones, in a random order."""
    base = int(time.time() - 86400) * 1_000_000_000
    sizes: list[tuple[str, int]] = [(f"big/large-{k}.bin", fs_size // 4) for k in range(2)]
    sizes += [(f"small/s{k:03d}.dat", rng.randint(1, 64 << 10)) for k in range(40)]
    k = 0
    while sum(s for _, s in sizes) < total:
        sizes.append((f"mid/m{k:03d}.bin", rng.randint(1 * MiB, 4 * MiB)))
        k += 1
    rng.shuffle(sizes)
    # mtimes start one day ago, so a file dropped later with an older mtime goes first.
    return [DroppedFile(name, rng.randbytes(size), base + (i + 10) * 1_000_000_000)
            for i, (name, size) in enumerate(sizes)]


# ---- looking at the site ----------------------------------------------------------------------


def read_log(site: Site) -> list[dict[str, Any]]:
    return site.log_events()


def log_text(site: Site) -> str:
    return site.log_path.read_text(errors="replace") if site.log_path.exists() else ""


def metric_total(port: int, name: str, labels: str = "") -> float:
    """Sum of a metric's samples whose label set contains `labels` (e.g. 'kind="disk_full"')."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and (not labels or labels in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def spool_left(site: Site) -> set[str]:
    return {c.name for c in scan(site.spool(SPOOL), None)}


def _tail(site: Site, n: int = 6) -> str:
    """The last log lines, each cut short: enough to see what the daemon was doing."""
    return "\n".join(line[:240] for line in site.log_tail(n).splitlines())


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["ts"])).timestamp()


def _index(state: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{state / 'index.sqlite'}?mode=ro", uri=True)


def check_store(state: Path, quiescent: bool) -> list[str]:
    """Consistency of a store: the SQLite index, and every file it names against its record.

    `quiescent`: no ingest or upload running, so staging must be empty and no file may be
    on disk that the index does not name.
    """
    problems: list[str] = []
    db = _index(state)
    try:
        result = db.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            problems.append(f"PRAGMA integrity_check: {result[:5]}")
        chunks = db.execute("SELECT id, sealed_size, sealed_hash, state FROM chunks "
                            "WHERE has_file=1").fetchall()
        manifests = db.execute("SELECT id, manifest_bytes, manifest_hash FROM objects "
                               "WHERE state='queued'").fetchall()
        corrupt = db.execute("SELECT COUNT(*) FROM chunks WHERE state='corrupt'").fetchone()[0]
        damaged = db.execute("SELECT COUNT(*) FROM objects WHERE state='damaged'").fetchone()[0]
    finally:
        db.close()
    if corrupt or damaged:
        problems.append(f"{corrupt} chunks corrupt, {damaged} objects damaged in the index")
    known: set[Path] = set()
    for cid, size, digest, st in chunks:
        path = state / "chunks" / cid[:2] / cid
        known.add(path)
        if not path.exists():
            if quiescent or st != "uploaded":
                problems.append(f"chunk {cid} ({st}) is in the index but its file is missing")
            continue
        data = path.read_bytes()
        if len(data) != size or blake3.blake3(data).hexdigest() != digest:
            problems.append(f"chunk file {path} does not match the index (size/hash)")
    for oid, size, digest in manifests:
        path = state / "manifests" / oid
        known.add(path)
        if not path.exists():
            problems.append(f"manifest of queued object {oid} is missing")
            continue
        data = path.read_bytes()
        if len(data) != size or (digest and blake3.blake3(data).hexdigest() != digest):
            problems.append(f"manifest file {path} does not match the index (size/hash)")
    if quiescent:
        for d in ("chunks", "manifests", "staging"):
            for p in (state / d).rglob("*"):
                if p.is_file() and p not in known:
                    problems.append(f"{p.relative_to(state)} is on disk but not in the index "
                                    "(half-written or orphaned)")
    return problems


# ---- the daemon trial -------------------------------------------------------------------------


@dataclass
class TrialConfig:
    fs_size: int = 64 * MiB
    fs_kind: str = "auto"
    drop_factor: float = 2.2  # bytes dropped in phase 1 / filesystem size
    seed: int = 6
    quiet_s: float = 8.0  # watched after the refusal: no log spam, retries continue
    timeout_s: float = 120.0


@dataclass
class TrialReport:
    fs: str = ""
    fs_note: str | None = None
    fs_size: int = 0
    free_at_start: int = 0  # what the agent could use: the filesystem less the other file
    free_at_restart: int = -1
    midfile_size: int = 0
    quiet_s: float = 0.0
    dropped_files: int = 0
    dropped_bytes: int = 0
    accepted_files: int = 0
    accepted_bytes: int = 0
    refusal_latency_s: float | None = None
    refusal_message: str = ""
    refusal_warnings: int = 0
    quiet_warnings: int = 0
    quiet_retries: float = 0
    disk_full_metric: float = 0
    resume_after_grow_s: float | None = None
    space_back: str = ""
    midfile_staged_bytes: int = 0
    midfile_refusal: str = ""
    uplink_disk_full_events: int = 0
    resume_after_window_s: float | None = None
    drain_s: float | None = None
    restored_ok: int = 0  # objects (small files may share one)
    restored_files: int = 0  # dropped files restored byte-identical
    verify_problems: int = -1
    commit_trial: str = ""
    seconds: float = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _Watch:
    """Waits for an event in the daemon log (from an offset), failing if the daemon died."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def until(self, cond: Callable[[], bool], timeout: float, what: str) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if cond():
                return time.monotonic() - start
            if self.site.proc is not None and self.site.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.site.proc.returncode}) while "
                                     f"waiting for {what}:\n{_tail(self.site)}")
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n"
                             f"{_tail(self.site)}")


def _events(site: Site, name: str, after: float = 0.0) -> list[dict[str, Any]]:
    return [e for e in read_log(site) if e.get("event") == name and _ts(e) >= after]


def _closed_windows() -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(days=1)
    return {"mode": "schedule", "intervals": [
        {"start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat()}]}


class DiskFullTrial:
    def __init__(self, root: Path, cfg: TrialConfig) -> None:
        self.root = root
        self.cfg = cfg
        self.report = TrialReport()
        self.rng = random.Random(cfg.seed)
        self.big_size = cfg.fs_size * 3 // 8  # the file the disk fills in the middle of
        # What comes back in phase 2: the filesystem grows by it, or (where the kernel does
        # not resize a mounted ext4) another program deletes a file of that size.
        self.room_back = self.big_size + DISK_HEADROOM_BYTES + 2 * MiB  # that file only
        self.fs = SmallFs(root / "state", cfg.fs_size + self.room_back, cfg.fs_kind,
                          image_dir=root)
        self.other = Ballast(root / "state" / "other-program.bin")
        self.site: Site | None = None
        self.dropped: dict[str, DroppedFile] = {}
        self.starts = 1  # daemon starts so far (one more for each restart)

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    def run(self) -> TrialReport:
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.fs.mount()  # SmallFsUnavailable propagates: the caller skips or fails
        try:
            self.report.fs = self.fs.describe()
            self.report.fs_note = self.fs.fallback_reason
            self.report.fs_size = self.fs.total()
            self._run_phases()
        except AssertionError as e:
            self.problem(str(e))
        except Exception as e:  # a harness error is a failed check, with where it came from
            self.problem(f"trial raised {type(e).__name__}: {e}\n{traceback.format_exc()}")
        finally:
            if self.site is not None:
                self.site.close()
            self.fs.close()
            self.report.seconds = time.monotonic() - started
        return self.report

    def _run_phases(self) -> None:
        spool = self.root / "spool" / SPOOL
        self.site = site = Site(self.root, site_id="disk-full", spools={SPOOL: "normal"}, extra={
            "windows": _closed_windows(),
            "store": {"quota": QUOTA},
            "chunking": SMALL_CHUNKING,
            "spool": [{"name": SPOOL, "path": str(spool), "priority": "normal",
                       "settle": "0s", "scan_interval": "0.2s"}],
        })
        if parse_size(QUOTA) <= self.fs.total():
            self.problem("the quota is not above the filesystem's size: the trial would test it")
        watch = _Watch(site)
        self.other.fill(self.room_back)  # another program's file: phase 1 sees fs_size
        self.phase_fill(site, watch)
        ballast = Ballast(self.fs.mountpoint / "ballast.bin")
        self.phase_midfile(site, watch, ballast)
        opened = self.phase_open(site, watch)
        self.phase_restart(site, watch, ballast)
        self.phase_drain(site, watch, ballast, opened)
        self.phase_end(site)

    # ---- phase 1 ------------------------------------------------------------------------

    def phase_fill(self, site: Site, watch: _Watch) -> None:
        rep = self.report
        files = make_files(self.rng, int(self.cfg.fs_size * self.cfg.drop_factor),
                           self.cfg.fs_size)
        for f in files:
            drop_file(site.spool(SPOOL), f.name, f.data, mtime_ns=f.mtime_ns)
            self.dropped[f.name] = f
        rep.dropped_files = len(files)
        rep.dropped_bytes = sum(len(f.data) for f in files)
        rep.free_at_start = self.fs.free()
        site.start()
        watch.until(lambda: bool(_events(site, "ingest_refused")), self.cfg.timeout_s,
                    "the disk-full refusal")
        # Until nothing more is accepted for a while: what fitted is in, the rest refused.
        last, since = spool_left(site), time.monotonic()
        while time.monotonic() - since < 2.0:
            time.sleep(0.2)
            now = spool_left(site)
            if now != last:
                last, since = now, time.monotonic()
        refused = _events(site, "ingest_refused")
        first = refused[0]
        rep.refusal_message = str(first.get("msg", ""))
        accepted_events = [e for e in read_log(site) if e.get("event") == "file_accepted"]
        before = [e for e in accepted_events if _ts(e) <= _ts(first)]
        if before:
            rep.refusal_latency_s = _ts(first) - _ts(before[-1])
        left = spool_left(site)
        accepted = [f for n, f in self.dropped.items() if n not in left]
        rep.accepted_files = len(accepted)
        rep.accepted_bytes = sum(len(f.data) for f in accepted)

        # (1) A clear refusal: says the disk, where, and what to do; counted; once.
        msg = rep.refusal_message
        for needle, why in (("disk", "that the disk is full"),
                            (str(site.state), "where (state_dir)"),
                            ("free space", "what to do"),
                            ("resumes by itself", "that it resumes by itself"),
                            ("stays", "that the data stays at its source")):
            if needle not in msg:
                self.problem(f"refusal message does not say {why}: {msg!r}")
        if first.get("reason") != "disk_full":
            self.problem(f"the refusal's reason is {first.get('reason')!r}, not disk_full")
        if not accepted:
            self.problem("nothing was accepted before the disk filled")
        if not left:
            self.problem("every file was accepted: the disk never filled")
        rep.disk_full_metric = metric_total(site.metrics_port, "skyferry_errors_total",
                                            'kind="disk_full"')
        if rep.disk_full_metric < 1:
            self.problem("skyferry_errors_total{kind=\"disk_full\"} did not count the refusal")
        if metric_total(site.metrics_port, "skyferry_quota_refusals_total") < 1:
            self.problem("skyferry_quota_refusals_total did not count the refusal")
        self._check_spool_untouched(site, "after the refusal")

        # Retries go on (backing off) without a log line each.
        lines_before = len(read_log(site))
        retries_before = metric_total(site.metrics_port, "skyferry_quota_refusals_total")
        time.sleep(self.cfg.quiet_s)
        quiet = read_log(site)[lines_before:]
        rep.quiet_warnings = sum(e.get("level") in ("warning", "error", "critical")
                                 for e in quiet)
        rep.quiet_s = self.cfg.quiet_s
        rep.quiet_retries = (metric_total(site.metrics_port, "skyferry_quota_refusals_total")
                             - retries_before)
        rep.refusal_warnings = len(_events(site, "ingest_refused"))
        if rep.quiet_warnings:
            self.problem(f"{rep.quiet_warnings} warnings logged in {self.cfg.quiet_s:.0f}s "
                         "while the disk stayed full (expected one per episode)")
        if rep.refusal_warnings != 1:
            self.problem(f"{rep.refusal_warnings} ingest_refused warnings in one episode")
        if rep.quiet_retries < max(1, self.cfg.quiet_s / REFUSED_BACKOFF_MAX_S - 1):
            self.problem(f"{rep.quiet_retries:.0f} retries in {self.cfg.quiet_s:.0f}s while the "
                         f"disk stayed full (backoff is at most {REFUSED_BACKOFF_MAX_S:g}s)")
        if rep.quiet_retries > self.cfg.quiet_s / 0.2 + 1:
            self.problem(f"{rep.quiet_retries:.0f} retries in {self.cfg.quiet_s:.0f}s: no backoff")
        self._check_running(site, "after the refusal")
        # (2) No corruption: the index and every file it names, nothing half-written.
        for p in check_store(site.state, quiescent=True):
            self.problem(f"after the refusal: {p}")

    # ---- phase 2 ------------------------------------------------------------------------

    def phase_midfile(self, site: Site, watch: _Watch, ballast: Ballast) -> None:
        """Space returns (the filesystem grows); a large file starts; the disk fills mid-file."""
        rep = self.report
        assert site.proc is not None
        oldest = min(f.mtime_ns for f in self.dropped.values())
        big = DroppedFile("big/midfile.bin", self.rng.randbytes(self.big_size),
                          oldest - 1_000_000_000)  # oldest: the next one the spool tries
        drop_file(site.spool(SPOOL), big.name, big.data, mtime_ns=big.mtime_ns)
        self.dropped[big.name] = big
        rep.midfile_size = len(big.data)
        staging = site.state / "staging"
        caught: dict[str, Any] = {}

        # Bigger than any other file dropped (those are at most 4 MiB): its staging folder
        # past this size with no manifest yet is the large file, part-way through.
        mark = 4 * MiB + MiB // 2

        def big_stage() -> Path | None:
            for d in staging.iterdir():
                files = list(d.iterdir()) if d.is_dir() else []
                if (not any(f.name == "manifest" for f in files)
                        and sum(f.stat().st_size for f in files) > mark):
                    return d
            return None

        def catch() -> None:
            """Pause the daemon part-way through the large file, fill the disk, let it go on."""
            deadline = time.monotonic() + self.cfg.timeout_s
            while time.monotonic() < deadline:
                with contextlib.suppress(FileNotFoundError):
                    if big_stage() is not None:
                        assert site.proc is not None
                        os.kill(site.proc.pid, signal.SIGSTOP)
                        try:
                            caught["at"] = time.monotonic()
                            stage = big_stage()
                            files = list(stage.iterdir()) if stage is not None else []
                            caught["staged"] = sum(f.stat().st_size for f in files)
                            caught["manifest"] = stage is None
                            ballast.fill()
                        finally:
                            os.kill(site.proc.pid, signal.SIGCONT)
                        return
                time.sleep(0.0005)

        catcher = threading.Thread(target=catch, daemon=True)
        catcher.start()
        grown_at = time.monotonic()
        if self.fs.kind == "ext4":
            self.other.release()
            rep.space_back = (f"another program deleted its {_mib(self.room_back)} file "
                              "(online resize2fs of a mounted ext4 is refused here)")
        else:
            self.fs.grow(self.fs.size + self.room_back)
            rep.space_back = f"the filesystem grew by {_mib(self.room_back)} (remount,size=)"
        catcher.join(self.cfg.timeout_s)
        if "at" not in caught:
            raise AssertionError(f"ingest did not resume after {rep.space_back}:\n"
                                 f"{_tail(site)}")
        rep.resume_after_grow_s = caught["at"] - grown_at
        rep.midfile_staged_bytes = int(caught["staged"])
        if caught["manifest"]:
            self.problem("the pause came after the whole file was staged, not mid-file")

        def midfile_refusals() -> list[str]:
            return [str(e.get("msg", "")) for e in read_log(site)
                    if str(e.get("event", "")).startswith("ingest_refused")
                    and e.get("file") == big.name and "No space left" in str(e.get("msg", ""))]

        watch.until(lambda: bool(midfile_refusals()), self.cfg.timeout_s,
                    "the refusal of the mid-file ENOSPC")
        rep.midfile_refusal = midfile_refusals()[0]
        time.sleep(0.5)
        # The abandoned ingest gave its blocks back: take those too, then check.
        ballast.fill()
        if big.name not in spool_left(site):
            self.problem("the large file was accepted although the disk filled mid-file")
        self._check_spool_untouched(site, "after ENOSPC mid-file")
        self._check_running(site, "after ENOSPC mid-file")
        for p in check_store(site.state, quiescent=True):
            self.problem(f"after ENOSPC mid-file: {p}")

    def phase_restart(self, site: Site, watch: _Watch, ballast: Ballast) -> None:
        """A clean stop, then another program takes every free block, then a start: the
        daemon must come up (on its spare blocks) and stay up (no crash loop), queue intact."""
        rep = self.report
        rc = site.stop(timeout=30)
        if rc != 0:
            self.problem(f"clean stop on a full disk exited {rc}:\n{_tail(site)}")
        ballast.fill()
        rep.free_at_restart = self.fs.free()
        self.starts += 1
        site.start()
        watch.until(lambda: len(_events(site, "started")) >= self.starts, 30,
                    "the daemon to start on a full disk")
        time.sleep(3.0)  # several scans and retries
        self._check_running(site, "restarted on a full disk")
        for p in check_store(site.state, quiescent=False):
            self.problem(f"restarted on a full disk: {p}")

    # ---- phase 3 ------------------------------------------------------------------------

    def phase_open(self, site: Site, watch: _Watch) -> float:
        """The window opens while another program holds the disk full: uploads must still be
        recorded, local copies go, and ingest resumes by itself as space returns. Returns
        when (monotonic) the window opened."""
        rep = self.report
        assert site.proc is not None
        left_before = spool_left(site)
        site.extra["windows"] = {"mode": "always"}
        site.write_config()
        opened = time.time()
        opened_mono = time.monotonic()
        os.kill(site.proc.pid, signal.SIGHUP)
        watch.until(lambda: bool(_events(site, "reloaded", opened)), 30, "the reload")
        watch.until(lambda: bool(_events(site, "object_committed", opened)), self.cfg.timeout_s,
                    "an upload recorded on the full disk")
        watch.until(lambda: spool_left(site) != left_before, self.cfg.timeout_s,
                    "ingest to resume as uploads free space (the other program still holds "
                    "the disk)")
        rep.resume_after_window_s = time.monotonic() - opened_mono
        rep.uplink_disk_full_events = len(_events(site, "uplink_disk_full"))
        return opened_mono

    def phase_drain(self, site: Site, watch: _Watch, ballast: Ballast, opened: float) -> None:
        """The other programs let go: everything drains."""
        ballast.release()
        self.other.release()
        watch.until(lambda: not spool_left(site) and self._queued(site) == 0,
                    self.cfg.timeout_s, "the spool and queue to drain")
        self.report.drain_s = time.monotonic() - opened

    def _queued(self, site: Site) -> int:
        db = _index(site.state)
        try:
            return int(db.execute("SELECT COUNT(*) FROM objects WHERE state='queued'")
                       .fetchone()[0])
        finally:
            db.close()

    # ---- phase 4 ------------------------------------------------------------------------

    def phase_end(self, site: Site) -> None:
        rep = self.report
        rc = site.stop(timeout=30)
        if rc != 0:
            self.problem(f"clean stop exited {rc}")
        text = log_text(site)
        if "Traceback" in text:
            self.problem("a traceback in the daemon log:\n" + text[text.index("Traceback"):][:2000])
        for e in read_log(site):
            if e.get("level") in ("error", "critical") and e.get("event") != "uplink_disk_full":
                self.problem(f"daemon logged {e.get('event')}: {e.get('msg')}")
        for p in check_store(site.state, quiescent=True):
            self.problem(f"at the end: {p}")
        db = _index(site.state)
        try:
            states = dict(db.execute("SELECT state, COUNT(*) FROM objects GROUP BY state"))
        finally:
            db.close()
        out = self.root / "restored"
        restore = json.loads(site.restore(out, check=False).stdout)
        verify = json.loads(site.verify(check=False).stdout)
        rep.restored_ok = int(restore["objects_ok"])
        rep.verify_problems = len(verify["problems"])
        for what, r in (("restore", restore), ("verify", verify)):
            for p in r["problems"]:
                self.problem(f"{what}: {p['what']}: {p['reason']}")
            if r["superseded"]:
                self.problem(f"{what}: {r['superseded']} superseded versions (a duplicate)")
        if set(states) - {"committed"}:
            self.problem(f"index objects by state at the end: {states}")
        got = tree_digest(out / site.site_id / SPOOL) if (out / site.site_id / SPOOL).exists() \
            else {}
        for name, f in self.dropped.items():
            if name not in got:
                self.problem(f"{name}: dropped but not restored")
            elif got[name] != f.digest:
                self.problem(f"{name}: restored bytes differ from those dropped")
            else:
                rep.restored_files += 1
        for name in set(got) - set(self.dropped):
            self.problem(f"{name}: restored but never dropped")

    # ---- shared checks ------------------------------------------------------------------

    def _check_spool_untouched(self, site: Site, when: str) -> None:
        for c in scan(site.spool(SPOOL), None):
            f = self.dropped.get(c.name)
            if f is None:
                self.problem(f"{when}: unexpected spool file {c.name}")
            elif (c.size, c.mtime_ns) != (len(f.data), f.mtime_ns) or c.path.read_bytes() != f.data:
                self.problem(f"{when}: spool file {c.name} was changed")

    def _check_running(self, site: Site, when: str) -> None:
        assert site.proc is not None
        if site.proc.poll() is not None:
            raise AssertionError(f"{when}: the daemon exited {site.proc.returncode}:\n"
                                 f"{_tail(site)}")
        if "Traceback" in log_text(site):
            self.problem(f"{when}: a traceback in the daemon log")
        starts = len(_events(site, "started"))
        if starts != self.starts:
            self.problem(f"{when}: the daemon started {starts} times, expected {self.starts}")


# ---- the in-process SQLite-commit trial -------------------------------------------------------


@contextlib.contextmanager
def _no_commit_room_check() -> Iterator[None]:
    """Let a commit reach SQLite on a full disk (the store normally refuses just before)."""
    saved = room.COMMIT_ROOM_BYTES
    room.COMMIT_ROOM_BYTES = 0
    try:
        yield
    finally:
        room.COMMIT_ROOM_BYTES = saved


def commit_trial(root: Path, fs_kind: str = "auto") -> tuple[str, list[str]]:
    """ENOSPC in the middle of an object's SQLite commit; returns (summary, problems)."""
    problems: list[str] = []
    root.mkdir(parents=True, exist_ok=True)
    fs = SmallFs(root / "fs", 24 * MiB, fs_kind, image_dir=root)
    fs.mount()
    try:
        keys = generate_keys(root / "keys", "commit-trial")
        edge = keys.edge_dir
        classes = [ClassSettings("normal", 0, "refuse")]
        store = Store(fs.mountpoint / "state", classes, None)
        chunking = ChunkingSettings(min_size=64 << 10, avg_size=128 << 10, max_size=256 << 10,
                                    pack_below=0)
        pipeline = Pipeline("commit-trial", load_edge_keys(
            edge / "recipient.pub", edge / "site.key", edge / "dedup.key"), store, chunking,
            CompressionSettings())
        src = root / "src"
        src.mkdir(exist_ok=True)
        rng = random.Random(7)
        warm = src / "warm.bin"
        warm.write_bytes(rng.randbytes(1 * MiB))
        pipeline.ingest_file(IngestRequest(warm, "t", "warm.bin", "normal"))
        victim = src / "victim.bin"
        victim.write_bytes(rng.randbytes(4 * MiB))  # ~30 chunks: a commit of several pages
        used_before = store.used_bytes
        # The commit must grow the WAL: empty it first, then let another program take the rest.
        store._index.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        ballast = Ballast(fs.mountpoint / "ballast.bin")
        real_commit = store.commit_object
        seen: dict[str, Any] = {}

        def commit_on_full_disk(staged: StagedObject) -> None:
            for cid in staged.new_chunks:  # so the disk runs out in SQLite, not in a mkdir
                store.chunk_path(cid).parent.mkdir(exist_ok=True)
            ballast.fill()
            seen["free"] = fs.free()
            with _no_commit_room_check():
                real_commit(staged)

        store.commit_object = commit_on_full_disk  # type: ignore[method-assign]
        try:
            pipeline.ingest_file(IngestRequest(victim, "t", "victim.bin", "normal"))
            problems.append("the commit succeeded on a full disk (WAL had room?)")
            raised: BaseException | None = None
        except DiskFullError as e:
            raised = e
        finally:
            store.commit_object = real_commit  # type: ignore[method-assign]
        cause = raised.__cause__ if raised is not None else None
        if raised is not None and not isinstance(cause, sqlite3.OperationalError):
            problems.append(f"the refusal did not come from SQLite: {cause!r}")
        if store._index.db.in_transaction:
            problems.append("the connection was left inside a transaction")
        if store.used_bytes != used_before:
            problems.append(f"used bytes moved from {used_before} to {store.used_bytes}")
        rows = store._index.db.execute("SELECT COUNT(*) FROM objects").fetchone()[0]
        if rows != 1:
            problems.append(f"{rows} objects in the index after the failed commit, expected 1")
        if any((store.staging_dir).iterdir()):
            problems.append("staging not empty after the failed commit")
        problems += [f"after the failed commit: {p}"
                     for p in check_store(store.state_dir, quiescent=True)]
        ballast.release()
        # The same Store, same connection: space is back, the same ingest now succeeds.
        result = pipeline.ingest_file(IngestRequest(victim, "t", "victim.bin", "normal"))
        rows = store._index.db.execute(
            "SELECT COUNT(*) FROM objects WHERE state='queued'").fetchone()[0]
        if rows != 2:
            problems.append(f"{rows} queued objects after space returned, expected 2")
        store.close()
        problems += [f"after space returned: {p}"
                     for p in check_store(fs.mountpoint / "state", quiescent=True)]
        summary = (f"{fs.describe()}: commit of a {len(victim.read_bytes()) // MiB} MiB object "
                   f"({result.chunks} chunks) with {seen.get('free', '?')} bytes free: "
                   f"{type(raised).__name__ if raised else 'no error'} from "
                   f"{type(cause).__name__ if cause else '-'} ({cause}); index intact, "
                   "nothing staged left, the same store accepted it once space returned")
        return summary, problems
    finally:
        fs.close()


# ---- report -----------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _rows(rep: TrialReport) -> list[tuple[str, str]]:
    return [
        ("filesystem for state_dir (store.quota is " + QUOTA + ": the disk fills first)",
         rep.fs + (f" ({rep.fs_note})" if rep.fs_note else "")),
        ("dropped with the window closed", f"{rep.dropped_files} files, "
         f"{_mib(rep.dropped_bytes)} (incompressible)"),
        ("accepted before the refusal", f"{rep.accepted_files} files, "
         f"{_mib(rep.accepted_bytes)} of {_mib(rep.free_at_start)} free "
         f"({rep.accepted_bytes / max(1, rep.free_at_start):.0%})"),
        ("refusal latency (last acceptance to refusal logged)", _s(rep.refusal_latency_s)),
        (f"warnings in the episode / while full for {rep.quiet_s:.0f} s",
         f"{rep.refusal_warnings} / {rep.quiet_warnings} ({rep.quiet_retries:.0f} silent "
         "retries)"),
        ("disk filled by another program mid-file",
         f"at {_mib(rep.midfile_staged_bytes)} of {_mib(rep.midfile_size)} staged: refused, "
         "staging removed, file untouched"),
        ("time to resume after space returned", f"{_s(rep.resume_after_grow_s)} "
         f"({rep.space_back})"),
        ("restart with the disk held full", f"started and stayed up "
         f"({_mib(max(0, rep.free_at_restart))} free)" if rep.free_at_restart >= 0 else "-"),
        ("time to resume after the window opened, disk still held full",
         _s(rep.resume_after_window_s)),
        ("uplink_disk_full episodes (spare given up)", str(rep.uplink_disk_full_events)),
        ("window open to everything committed", _s(rep.drain_s)),
        ("restore / verify", f"{rep.restored_files} of {rep.dropped_files + 1} files "
         f"byte-identical ({rep.restored_ok} objects) / {rep.verify_problems} problems"),
        ("ENOSPC inside an SQLite commit (in-process)", rep.commit_trial or "-"),
        ("wall time", _s(rep.seconds)),
        ("result", "PASS" if rep.ok else f"FAIL ({len(rep.problems)} problems)"),
    ]


def section(reports: list[TrialReport], argv: list[str]) -> str:
    cmd = " ".join(["python -m benchmarks.disk_full", *argv])
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
               f"Python {platform.python_version()}")
    ok = all(r.ok for r in reports)
    columns = [dict(_rows(r)) for r in reports]
    names = [k for k, _ in _rows(reports[0])]
    table = "\n".join(f"| {k} | " + " | ".join(c[k] for c in columns) + " |" for k in names)
    header = "| | " + " | ".join(f"trial {i + 1}" for i in range(len(reports))) + " |\n" \
             + "| --- " * (len(reports) + 1) + "|\n"
    body = (f"## Disk-full trial (`{cmd}`)\n\n"
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine}. "
            f"Result: **{'PASS' if ok else 'FAIL'}**.\n\n" + header + table + "\n\n"
            f"The refusal as logged: `{reports[0].refusal_message}`\n\n"
            "Checked in each trial: one warning per refusal episode naming the disk, state_dir "
            "and the remedy, counted in `skyferry_errors_total{kind=\"disk_full\"}` and "
            "`skyferry_quota_refusals_total`; refused files untouched in the spool; the daemon "
            "never exits or logs a traceback; after each phase `PRAGMA integrity_check` is ok "
            "and every chunk and manifest the index names is on disk with its recorded size and "
            "hash, nothing half-written or orphaned; ingest resumes by itself when space returns "
            "and when uploads free it; at the end every dropped file is restored byte-identical, "
            "once, and verify is clean. "
            f"The store keeps {DISK_HEADROOM_BYTES // MiB} MiB free for the index and holds a "
            f"{SPARE_BYTES // MiB} MiB spare file it gives up when another program takes that "
            "headroom, so uploads can still be recorded (which is what frees space).")
    problems = [f"trial {i + 1}: {p}" for i, r in enumerate(reports) for p in r.problems]
    if problems:
        body += "\n\nProblems:\n" + "\n".join(f"- {p[:600]}" for p in problems[:20])
    return body


def run(root: Path, cfg: TrialConfig) -> TrialReport:
    """The daemon trial, then the in-process commit trial (on a filesystem of its own)."""
    for d in (root / "site", root / "commit"):  # left by an earlier run with this workdir
        shutil.rmtree(d, ignore_errors=True)
    rep = DiskFullTrial(root / "site", cfg).run()
    try:
        rep.commit_trial, problems = commit_trial(root / "commit", cfg.fs_kind)
        rep.problems += [f"commit trial: {p}" for p in problems]
    except SmallFsUnavailable:
        raise
    except Exception as e:  # a harness error is a failed check, with its reason
        rep.problems.append(f"commit trial raised {type(e).__name__}: {e}")
    return rep


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.disk_full", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64MiB", help="what the agent may fill (default 64MiB)")
    ap.add_argument("--fs", nargs="+", choices=("auto", "ext4", "tmpfs"), default=["auto"],
                    help="one trial per filesystem kind (auto: ext4 on a loop device, else "
                         "tmpfs)")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--quiet", type=float, default=TrialConfig.quiet_s,
                    help="seconds watched while the disk stays full")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    add_output_options(ap)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="skyferry-diskfull-"))
    reports = []
    try:
        for i, kind in enumerate(args.fs):
            cfg = TrialConfig(fs_size=parse_size(args.size), fs_kind=kind, seed=args.seed,
                              quiet_s=args.quiet)
            reports.append(run(workdir / f"trial-{i + 1}", cfg))
    except SmallFsUnavailable as e:
        print(f"disk-full trial not run: {e}", file=sys.stderr)
        return 1
    write_report(reports, args.report_json)
    text = section(reports, argv)
    print(text)
    if not args.no_write:
        write_section("disk_full", text, args.results)
    ok = all(r.ok for r in reports)
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not ok:
        print(f"work folder kept at {workdir}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
