"""The demo's story: keys and config, files, sync through the daemon, restore and compare."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cloud.history import JOURNAL_DIR
from demo import CYCLE_CLOSED, CYCLE_OPEN, SITE, SPOOLS, MiB
from demo import land as demo_land
from demo.files import DemoFile, drop_into_spools, write_originals
from demo.report import Sync, Timings, report, size_text, store_stats
from tests.kits.site import CommandFailed, LogFollower, Site

DRAIN_TIMEOUT_S = 100.0
PROGRESS_EVERY_S = 3.0
MARKER = ".skyferry-demo"  # the only folders the demo agrees to wipe carry this file


class DemoError(Exception):
    """The demo could not run (as opposed to: it ran and found differences)."""


def make_site(work: Path) -> Site:
    """The demo site in `work`: keys, config (a local-folder cloud, a 15 s / 10 s window
    cycle), spool folders; the daemon is not started."""
    return Site(work, site_id=SITE, spools=dict(SPOOLS), extra={
        "windows": {"mode": "schedule", "cycle": {"open": CYCLE_OPEN, "closed": CYCLE_CLOSED}},
        "telemetry": {"log_level": "info"},
    })


# ---- watching the site -------------------------------------------------------------------


@dataclass
class Snapshot:
    """One look at the site while it runs."""

    elapsed: float
    gate: bool | None  # as the daemon last logged it
    spool_files: int
    queued_objects: int = 0
    queued_bytes: int = 0
    committed: int = 0
    cloud_objects: int = 0


class Watch:
    """The running daemon seen from outside: its log, the store's status, the cloud folder."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.log = LogFollower(site.log_path)
        self.started = time.monotonic()
        self.dropped_at: dict[int, float] = {}  # wave -> wall-clock time its files were in
        self._next_print = 0.0

    def snapshot(self) -> Snapshot:
        self.log.poll()
        snap = Snapshot(time.monotonic() - self.started, self.log.gate_open,
                        len(self.site.spool_files()),
                        cloud_objects=sum(1 for p in self.site.cloud.rglob("*") if p.is_file()))
        data = self.site.store_status()
        if data is None:
            return snap
        snap.queued_objects = int(data["queued_objects"])
        snap.queued_bytes = int(data["queued_bytes"])
        snap.committed = sum(int(c["items"].get("committed", 0))
                             for c in data["classes"].values())
        return snap

    def show(self, s: Snapshot, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_print:
            return
        self._next_print = now + PROGRESS_EVERY_S
        gate = {None: "...   ", True: "open  ", False: "closed"}[s.gate]
        print(f"  [{s.elapsed:5.1f}s] gate {gate}  spool {s.spool_files:3d} files  "
              f"queued {s.queued_objects:3d} objects {size_text(s.queued_bytes):>10}  "
              f"committed {s.committed:3d}  cloud {s.cloud_objects:3d} objects", flush=True)

    def until(self, done: Callable[[Snapshot], bool], deadline: float) -> Snapshot:
        """Print progress every few seconds until `done` says so; DemoError on trouble."""
        while True:
            proc = self.site.proc
            if proc is not None and proc.poll() is not None:
                raise DemoError(f"the daemon exited with {proc.returncode}:\n"
                                f"{self.site.log_tail(30)}")
            s = self.snapshot()
            if done(s):
                self.show(s, force=True)
                return s
            self.show(s)
            if time.monotonic() > deadline:
                raise DemoError(f"the queue did not drain in {DRAIN_TIMEOUT_S:.0f}s:\n"
                                f"{self.site.log_tail(30)}")
            time.sleep(0.25)


def sync(site: Site, files: list[DemoFile], originals: Path) -> Sync:
    """Run the daemon; drop wave 1, then wave 2 once the window closes; wait for the cloud."""
    wave1 = [f for f in files if f.wave == 1]
    wave2 = [f for f in files if f.wave == 2]
    site.start()
    watch = Watch(site)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    try:
        drop_into_spools(wave1, originals, site.spool)
        watch.dropped_at[1] = time.time()
        print(f"  daemon pid {site.proc.pid if site.proc else '?'} (log {site.log_path}); "
              f"dropped {len(wave1)} files while the window is open", flush=True)
        if wave2:
            watch.until(lambda s: s.gate is False, deadline)
            drop_into_spools(wave2, originals, site.spool)
            watch.dropped_at[2] = time.time()
            print(f"  window closed: dropped {len(wave2)} more files (every alarm, the camera "
                  "frame, a copy of an image already sent); they wait in the store", flush=True)
        watch.until(lambda s: s.spool_files == 0 and s.queued_objects == 0
                    and s.committed >= len(files), deadline)
    finally:
        _stop(site)
        watch.log.poll()
    return Sync(watch.log, watch.dropped_at)


def _stop(site: Site) -> None:
    if site.proc is None or site.proc.poll() is not None:
        return
    try:
        site.stop(timeout=30)
    except subprocess.TimeoutExpired:
        site.close()
        raise DemoError("the daemon did not stop within 30s of SIGTERM; killed it") from None


# ---- checking ----------------------------------------------------------------------------


def compare(files: list[DemoFile], originals: Path, restored: Path) -> list[str]:
    """Every difference between the originals and the restored tree, one line each."""
    problems: list[str] = []
    expected: set[Path] = set()
    for f in files:
        want = originals / f.spool / f.name
        got = restored / SITE / f.spool / f.name
        expected.add(got)
        label = f"{f.spool}/{f.name}"
        if not got.is_file():
            problems.append(f"{label}: missing from the restore")
            continue
        ws, gs = want.stat(), got.stat()
        if ws.st_size != gs.st_size:
            problems.append(f"{label}: size {gs.st_size}, expected {ws.st_size}")
        elif not _same_bytes(want, got):
            problems.append(f"{label}: content differs")
        if ws.st_mtime_ns != gs.st_mtime_ns:
            problems.append(f"{label}: mtime {gs.st_mtime_ns} ns, expected {ws.st_mtime_ns} ns")
    journal = restored / JOURNAL_DIR  # restore's own record of what it wrote, not a file sent
    for p in sorted(restored.rglob("*")):
        if p.is_file() and p not in expected and not p.is_relative_to(journal):
            problems.append(f"{p.relative_to(restored).as_posix()}: restored but never sent")
    return problems


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


# ---- main --------------------------------------------------------------------------------


def prepare_workdir(work: Path) -> None:
    """Wipe the work dir, but only if it is empty or a previous demo made it."""
    if work.exists():
        if not work.is_dir():
            raise DemoError(f"{work} exists and is not a folder; choose another --workdir")
        if any(work.iterdir()) and not (work / MARKER).exists():
            raise DemoError(f"{work} is not empty and was not made by the demo; refusing to "
                            "wipe it. Choose another --workdir, or empty it first")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by `python -m demo`; wiped by its next run\n")


def run(work: Path, total: int, seed: int) -> tuple[bool, str]:
    """The whole demo; returns (passed, report)."""
    t0 = time.monotonic()
    prepare_workdir(work)
    originals, restored = work / "originals", work / "restored"

    print(f"skyferry demo in {work}", flush=True)
    print("1/5 keys and config", flush=True)
    site = make_site(work)
    try:
        site.cli("check-config", str(site.config))
    except CommandFailed as e:
        raise DemoError(str(e)) from None

    print(f"2/5 generating {total} files (seed {seed})", flush=True)
    files = write_originals(originals, total, seed)
    print(f"  {len(files)} files, {size_text(sum(f.size for f in files))}, in {originals}",
          flush=True)
    t1 = time.monotonic()

    print(f"3/5 syncing through the daemon (windows: {CYCLE_OPEN} open, {CYCLE_CLOSED} closed)",
          flush=True)
    synced = sync(site, files, originals)
    t2 = time.monotonic()

    print("4/5 restoring with `skyferry restore` and comparing", flush=True)
    r = site.restore(restored, "--no-progress", check=False)
    try:
        restore_json: dict[str, Any] = json.loads(r.stdout)
    except ValueError:
        raise DemoError(f"skyferry restore exited {r.returncode} without a JSON report:\n"
                        f"{r.stdout}{r.stderr}") from None
    problems = [f"restore: {p['what']}: {p['reason']}" for p in restore_json.get("problems", [])]
    if r.returncode != 0 and not problems:
        problems.append(f"restore exited {r.returncode}: {r.stderr.strip()}")
    problems += compare(files, originals, restored)
    t3 = time.monotonic()
    problems += land_step(site, files, originals, work)

    stats = store_stats(site)
    timings = Timings(t1 - t0, t2 - t1, t3 - t2, time.monotonic() - t0)
    return not problems, report(files, stats, site.cloud, synced, restore_json, problems,
                                timings)


def land_step(site: Site, files: list[DemoFile], originals: Path, work: Path) -> list[str]:
    """5/5: `skyferry land` makes plain files of the sealed cloud; they are compared too."""
    folder = demo_land.landed_folder(work)
    print(f"5/5 landing with `skyferry land --once` into the plain folder {folder}", flush=True)
    refused = demo_land.prepare(folder)
    if refused is not None:
        print(f"  {refused}", flush=True)
        return []
    out, problems = demo_land.land(site, folder)
    problems += demo_land.without_bookkeeping(compare(files, originals, folder))
    print(demo_land.summary(files, folder, out), flush=True)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=(
        "Run one edge site end to end in a throw-away folder: spool -> store -> cloud "
        "-> restore, and compare every byte."))
    ap.add_argument("--workdir", type=Path, default=Path("demo-run"),
                    help="work folder, wiped at start (default: %(default)s)")
    ap.add_argument("--files", type=int, default=300, help="how many files (default: 300)")
    ap.add_argument("--seed", type=int, default=20261125, help="random seed for the files")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work folder after a PASS (it is always kept after a FAIL)")
    args = ap.parse_args(argv)
    if args.files < 1:
        ap.error("--files must be at least 1")
    work: Path = args.workdir.absolute()
    try:
        passed, text = run(work, args.files, args.seed)
    except DemoError as e:
        kept = f"\n(work folder kept for inspection: {work})" if (work / MARKER).exists() else ""
        print(f"\nFAIL: {e}{kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    body, _, verdict = text.rpartition("\n\n")  # the verdict comes last, after where to look
    print(body, flush=True)
    if passed and not args.keep:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
        print(f"(removed {work}; run with --keep to look around in it)")
    else:
        print(f"work folder kept: {work}")
    landed = demo_land.landed_folder(work)
    if (landed / demo_land.MARKER).exists():
        print(f"plain files landed by `skyferry land`: {landed / SITE} "
              f"(events: {landed / demo_land.BOOK / 'events'})")
    print(f"\n{verdict}", flush=True)
    return 0 if passed else 1
