"""`make demo`: one edge site, end to end, in a throw-away folder, with a verdict.

Generates a few hundred files into two spool folders, runs the daemon against a local-folder
"cloud" behind a simulated contact schedule (15 s open, 10 s closed), waits for the queue to
drain, restores with `skyferry restore` and compares every file byte for byte, mtimes included.
Exits 0 only when everything came back identical.

    python -m agent.demo [--workdir DIR] [--files N] [--keep] [--seed S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.cloud.history import JOURNAL_DIR

SITE = "demo-site"
SPOOLS = {"telemetry": "normal", "alarms": "critical"}
CYCLE_OPEN = "15s"
CYCLE_CLOSED = "10s"
DRAIN_TIMEOUT_S = 100.0
# Uploads already running when a window ends may land just after it: not a violation.
CLOSE_GRACE_S = 0.5
PROGRESS_EVERY_S = 3.0
MARKER = ".skyferry-demo"  # the only folders the demo agrees to wipe carry this file
BASE_MTIME_NS = 1_795_000_000 * 10**9  # 2026-11-18 UTC: fixed, so runs are reproducible
MiB = 1 << 20
KiB = 1 << 10


class DemoError(Exception):
    """The demo could not run (as opposed to: it ran and found differences)."""


# ---- generating the files ----------------------------------------------------------------


@dataclass(frozen=True)
class DemoFile:
    spool: str
    name: str  # relative to the spool root, POSIX separators
    size: int
    mtime_ns: int
    wave: int  # 1: dropped while the link is up; 2: dropped once the window has closed


_SENSORS = ("pump-1", "pump-2", "gen-a", "mast", "hut-3", "weather", "tank-n", "tank-s")
_WORDS = ("uplink", "window", "sensor", "pressure", "nominal", "battery", "generator",
          "satellite", "queue", "camp", "valve", "cooling", "restart", "threshold", "ok")


def _ts(rng: random.Random, base_s: int) -> str:
    t = base_s + rng.randint(0, 86_400)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _lines(size: int, line: Any) -> bytes:
    """Call `line()` until `size` bytes are produced; cut to exactly `size`."""
    parts: list[str] = []
    n = 0
    while n < size:
        s = line()
        parts.append(s)
        n += len(s.encode())
    return "".join(parts).encode()[:size]


def make_jsonl(rng: random.Random, size: int) -> bytes:
    base = BASE_MTIME_NS // 10**9

    def line() -> str:
        return json.dumps({
            "ts": _ts(rng, base), "sensor": rng.choice(_SENSORS),
            "temp_c": round(rng.gauss(21, 6), 2), "rh": round(rng.uniform(10, 95), 1),
            "batt_v": round(rng.uniform(11.4, 13.9), 3), "ok": rng.random() > 0.02,
        }) + "\n"

    return _lines(size, line)


def make_csv(rng: random.Random, size: int) -> bytes:
    base = BASE_MTIME_NS // 10**9
    header = "ts,sensor,pressure_bar,flow_lpm,valve\n"
    return (header + _lines(max(0, size - len(header)), lambda: (
        f"{_ts(rng, base)},{rng.choice(_SENSORS)},{rng.uniform(0.8, 3.2):.3f},"
        f"{rng.uniform(0, 120):.1f},{rng.choice(('open', 'shut'))}\n")).decode()).encode()[:size]


def make_text(rng: random.Random, size: int) -> bytes:
    base = BASE_MTIME_NS // 10**9
    levels = ("INFO", "INFO", "INFO", "WARN", "DEBUG")
    return _lines(size, lambda: (
        f"{_ts(rng, base)} {rng.choice(levels)} {rng.choice(_SENSORS)} "
        + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))) + "\n"))


def make_random(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


# A 16-level "sensor frame": random but low entropy, so zstd shrinks it by about half.
_FRAME_TABLE = bytes(0x40 + (i & 0x0F) for i in range(256))


def make_frame(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size).translate(_FRAME_TABLE)


_MAKERS = {"jsonl": make_jsonl, "csv": make_csv, "txt": make_text, "bin": make_random}


def plan_files(rng: random.Random, total: int) -> Iterator[tuple[str, str, str, int, int]]:
    """(spool, name, kind, size, wave): the special files first, then small ones up to `total`.

    Wave 2 (every alarm, the camera frame) is dropped while the window is closed: it must wait
    in the store, and the alarms must go first when the window opens again.
    """
    special: list[tuple[str, str, str, int, int]] = [
        ("telemetry", "camera/2026-11-18/frame-000001.raw", "frame", 40 * MiB, 2),
        ("telemetry", "imagery/sat-pass-0007.bin", "bin", 6 * MiB, 1),
        ("telemetry", "imagery/sat-pass-0008.bin", "bin", 3 * MiB, 1),
        ("telemetry", "logs/hourly/generator-2026-11-18.csv", "csv", 5 * MiB, 1),
        ("telemetry", "logs/hourly/pumps-2026-11-18.csv", "csv", 3 * MiB, 1),
        ("telemetry", "logs/weather-station.jsonl", "jsonl", 4 * MiB, 1),
        ("telemetry", "logs/syslog-2026-11-18.txt", "txt", 2 * MiB, 1),
        ("telemetry", "firmware/mast-controller-v2.3.bin", "bin", 7 * MiB, 1),
        ("telemetry", "Überwachung/température-站点-✓.txt", "txt", 48 * KiB, 1),
        ("telemetry", "markers/EMPTY", "bin", 0, 1),
        ("telemetry", "markers/one-byte", "bin", 1, 1),
        ("alarms", "snapshots/pump-2-overpressure.csv", "csv", 1 * MiB, 2),
    ]
    yield from special[:total]
    folders = {
        "telemetry": ("sensors/{s}/2026-11-18", "sensors/{s}/2026-11-17", "logs/{s}", "misc"),
        "alarms": ("active/{s}", "cleared/{s}"),
    }
    for i in range(max(0, total - len(special))):
        spool = "alarms" if i % 8 == 0 else "telemetry"
        if spool == "alarms":
            kind = "jsonl"
            size = rng.randint(120, 4 * KiB)
        else:
            kind = rng.choice(("jsonl", "jsonl", "csv", "txt", "bin"))
            # Log-uniform from 256 B to 1 MiB: many small files, a few large ones.
            size = int(2 ** rng.uniform(8, 20))
        folder = rng.choice(folders[spool]).format(s=rng.choice(_SENSORS))
        yield spool, f"{folder}/{kind}-{i:04d}.{kind}", kind, size, 2 if spool == "alarms" else 1


def write_originals(originals: Path, total: int, seed: int) -> list[DemoFile]:
    """Create `total` demo files under originals/<spool>/...; deterministic for a given seed."""
    rng = random.Random(seed)
    files: list[DemoFile] = []
    for index, (spool, name, kind, size, wave) in enumerate(plan_files(rng, max(1, total - 1))):
        data = make_frame(rng, size) if kind == "frame" else _MAKERS[kind](rng, size)
        mtime_ns = BASE_MTIME_NS + index * 7_300_000_000 + rng.randrange(10**9)
        _write(originals / spool / name, data, mtime_ns)
        files.append(DemoFile(spool, name, size, mtime_ns, wave))
    if total < 2:
        return files
    # The same bytes under a second name, dropped after the first copy is already in the
    # cloud: its chunks are neither stored nor sent again, only its manifest is.
    first = files[1] if len(files) > 1 else files[0]
    dup = DemoFile(first.spool, "imagery/archive/sat-pass-0007 (copy).bin", first.size,
                   BASE_MTIME_NS + len(files) * 7_300_000_000, 2)
    dup_path = originals / dup.spool / dup.name
    dup_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(originals / first.spool / first.name, dup_path)
    os.utime(dup_path, ns=(dup.mtime_ns, dup.mtime_ns))
    files.append(dup)
    return files


def _write(path: Path, data: bytes, mtime_ns: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def drop_into_spools(files: list[DemoFile], originals: Path, spool_root: Path) -> None:
    """Copy like a well-behaved producer: temporary name, then rename into place."""
    for f in files:
        dest = spool_root / f.spool / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copy2(originals / f.spool / f.name, tmp)
        os.replace(tmp, dest)


# ---- the site ----------------------------------------------------------------------------


def _toml(value: str | Path) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value))


def write_config(work: Path) -> Path:
    spools = "".join(
        f"\n[[spool]]\nname = {_toml(name)}\npath = {_toml(Path('spool') / name)}\n"
        f'priority = {_toml(cls)}\nsettle = "0.3s"\nscan_interval = "0.2s"\ncreate = true\n'
        for name, cls in SPOOLS.items()
    )
    text = f"""\
# Written by `python -m agent.demo`: a throw-away site with a local-folder cloud.
# Relative paths are taken from this file's folder. See config/skyferry.toml for every key.

[site]
id = {_toml(SITE)}
state_dir = "state"

[keys]
recipient_public = "keys/edge/recipient.pub"
signing_key = "keys/edge/site.key"
dedup_key = "keys/edge/dedup.key"
{spools}
[backend]
url = {_toml((work / "cloud").as_uri())}

[windows]
mode = "schedule"
cycle = {{ open = {_toml(CYCLE_OPEN)}, closed = {_toml(CYCLE_CLOSED)} }}

[telemetry]
log_format = "json"
"""
    path = work / "skyferry.toml"
    path.write_text(text, encoding="utf-8")
    return path


def skyferry(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would; raise DemoError with its output when it fails."""
    r = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        raise DemoError(f"skyferry {args[0]} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


class DaemonLog:
    """Reads the daemon's JSON log as it grows: gate state and events seen so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.events: list[dict[str, Any]] = []
        self.gate_open: bool | None = None

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            self.events.append(event)
            if event.get("event") in ("gate_open", "gate_closed"):
                self.gate_open = event["event"] == "gate_open"

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e.get("event") == name)

    def problems(self) -> list[str]:
        return [str(e.get("msg")) for e in self.events
                if e.get("level") in ("warning", "error", "critical")]

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])


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


def _count_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


class Site:
    """The daemon subprocess and the folders around it."""

    def __init__(self, work: Path, config: Path) -> None:
        from agent.config.reader import load_settings

        self.work = work
        self.config = config
        self.settings = load_settings(config)
        self.spool_root = work / "spool"
        self.cloud = work / "cloud"
        self.log = DaemonLog(work / "daemon.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.dropped_at: dict[int, float] = {}  # wave -> wall-clock time its files were in
        self._next_print = 0.0

    def start(self) -> None:
        with open(self.log.path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def snapshot(self) -> Snapshot:
        from agent.cli.status import status_data
        from agent.errors import SkyferryError

        self.log.poll()
        snap = Snapshot(time.monotonic() - self.started, self.log.gate_open,
                        _count_files(self.spool_root), cloud_objects=_count_files(self.cloud))
        if not (self.settings.site.state_dir / "index.sqlite").exists():
            return snap
        try:
            data = status_data(self.settings, time.time())
        except (SkyferryError, sqlite3.Error):
            return snap  # caught mid-creation: ask again next time
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
              f"queued {s.queued_objects:3d} objects {_size(s.queued_bytes):>10}  "
              f"committed {s.committed:3d}  cloud {s.cloud_objects:3d} objects", flush=True)

    def watch(self, done: Callable[[Snapshot], bool], deadline: float) -> Snapshot:
        """Print progress every few seconds until `done` says so; DemoError on trouble."""
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise DemoError(f"the daemon exited with {self.proc.returncode}:\n"
                                f"{self.log.tail()}")
            s = self.snapshot()
            if done(s):
                self.show(s, force=True)
                return s
            self.show(s)
            if time.monotonic() > deadline:
                raise DemoError(f"the queue did not drain in {DRAIN_TIMEOUT_S:.0f}s:\n"
                                f"{self.log.tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise DemoError("the daemon did not stop within 30s of SIGTERM; killed it") from None
        finally:
            self.log.poll()


def sync(site: Site, files: list[DemoFile], originals: Path) -> None:
    """Run the daemon; drop wave 1, then wave 2 once the window closes; wait for the cloud."""
    wave1 = [f for f in files if f.wave == 1]
    wave2 = [f for f in files if f.wave == 2]
    site.start()
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    try:
        drop_into_spools(wave1, originals, site.spool_root)
        site.dropped_at[1] = time.time()
        print(f"  daemon pid {site.proc.pid if site.proc else '?'} (log {site.log.path}); "
              f"dropped {len(wave1)} files while the window is open", flush=True)
        if wave2:
            site.watch(lambda s: s.gate is False, deadline)
            drop_into_spools(wave2, originals, site.spool_root)
            site.dropped_at[2] = time.time()
            print(f"  window closed: dropped {len(wave2)} more files (every alarm, the camera "
                  "frame, a copy of an image already sent); they wait in the store", flush=True)
        site.watch(lambda s: s.spool_files == 0 and s.queued_objects == 0
                   and s.committed >= len(files), deadline)
    finally:
        site.stop()


# ---- checking and reporting --------------------------------------------------------------


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


@dataclass
class StoreStats:
    chunk_refs: int = 0  # chunks named by manifests, repeats included
    chunks: int = 0  # distinct chunks kept
    ref_plain: int = 0  # plaintext bytes of chunk_refs
    plain: int = 0  # plaintext bytes of the distinct chunks
    sealed: int = 0  # sealed (compressed + encrypted) bytes of the distinct chunks
    manifests: int = 0  # sealed manifest bytes
    ok: bool = False


def store_stats(state_dir: Path) -> StoreStats:
    """Chunk and byte counts from the store's index, opened read-only after the daemon stopped."""
    s = StoreStats()
    try:
        db = sqlite3.connect(f"{(state_dir / 'index.sqlite').as_uri()}?mode=ro", uri=True)
        try:
            s.chunk_refs, s.ref_plain = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(c.plain_size), 0) FROM object_chunks oc "
                "JOIN chunks c ON c.id = oc.chunk_id").fetchone()
            s.chunks, s.plain, s.sealed = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(plain_size), 0), COALESCE(SUM(sealed_size), 0) "
                "FROM chunks").fetchone()
            (s.manifests,) = db.execute(
                "SELECT COALESCE(SUM(manifest_bytes), 0) FROM objects").fetchone()
            s.ok = True
        finally:
            db.close()
    except sqlite3.Error as e:
        print(f"  (store statistics unavailable: {e})", file=sys.stderr)
    return s


def tree_bytes(root: Path) -> tuple[int, int]:
    """(files, bytes) below root."""
    sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["ts"])).timestamp()


def sent_while_closed(log: DaemonLog, cloud: Path) -> int:
    """Cloud objects written while the schedule had the window closed (should be none)."""
    closed = [(_when(e) + CLOSE_GRACE_S, float(e["next_change"])) for e in log.events
              if e.get("event") == "gate_closed" and isinstance(e.get("next_change"), int | float)]
    return sum(1 for p in cloud.rglob("*") if p.is_file()
               and any(a <= p.stat().st_mtime < b for a, b in closed))


def second_window(log: DaemonLog, files: list[DemoFile]) -> str | None:
    """How soon after the window reopened the alarms, and then the big frame, were in."""
    # The schedule's reopening time: the daemon logs gate changes on a 0.2 s tick, later.
    reopen_at = [float(e["next_change"]) for e in log.events if e.get("event") == "gate_closed"
                 and isinstance(e.get("next_change"), int | float)]
    if not reopen_at:
        return None
    reopen = reopen_at[0]
    wave2 = {(f.spool, f.name) for f in files if f.wave == 2}
    commit_at = {str(e.get("object")): _when(e) for e in log.events
                 if e.get("event") == "object_committed"}
    alarms: list[float] = []
    frame: list[float] = []
    for e in log.events:
        key = (str(e.get("source")), str(e.get("file")))
        t = commit_at.get(str(e.get("object")))
        if e.get("event") != "file_accepted" or key not in wave2 or t is None:
            continue
        if key[0] == "alarms":
            alarms.append(t)
        elif key[1].startswith("camera/"):
            frame.append(t)
    if not alarms:
        return None
    parts = [f"all {len(alarms)} alarms (critical) in the cloud "
             f"{max(alarms) - reopen:.1f}s after it opened"]
    if frame:
        parts.append(f"the 40 MiB camera frame (normal) {max(frame) - reopen:.1f}s after")
    return "; ".join(parts)


def ingest_rates(log: DaemonLog, files: list[DemoFile], dropped_at: dict[int, float]) -> str:
    """Per wave: files and bytes accepted, and how fast, from the drop to the last acceptance."""
    wave_of = {(f.spool, f.name): f.wave for f in files}
    accepted: dict[int, list[tuple[float, int]]] = {}
    for e in log.events:
        wave = wave_of.get((str(e.get("source")), str(e.get("file"))))
        if e.get("event") == "file_accepted" and wave is not None:
            accepted.setdefault(wave, []).append((_when(e), int(e.get("bytes") or 0)))
    parts = []
    for wave, got in sorted(accepted.items()):
        took = max(t for t, _ in got) - dropped_at.get(wave, min(t for t, _ in got))
        nbytes = sum(n for _, n in got)
        rate = f"{_size(nbytes / took)}/s, {len(got) / took:.0f} files/s" if took > 0 else "n/a"
        parts.append(f"wave {wave}: {len(got)} files, {_size(nbytes)} in {took:.1f}s ({rate})")
    return "; ".join(parts)


@dataclass
class Timings:
    generate: float = 0.0
    sync: float = 0.0
    restore: float = 0.0
    total: float = 0.0


def report(files: list[DemoFile], stats: StoreStats, site: Site, restore_json: dict[str, Any],
           problems: list[str], t: Timings) -> str:
    cloud, log = site.cloud, site.log
    bytes_in = sum(f.size for f in files)
    per_spool = {s: sum(1 for f in files if f.spool == s) for s in SPOOLS}
    cloud_files, cloud_bytes = tree_bytes(cloud)
    lines = [
        "",
        "skyferry demo report",
        "--------------------",
        f"files in         {len(files)} ("
        + ", ".join(f"{n} {s}/{SPOOLS[s]}" for s, n in per_spool.items())
        + f"), {_size(bytes_in)}",
    ]
    if stats.ok:
        stored = stats.sealed + stats.manifests
        lines += [
            f"bytes stored     {_size(stored)} sealed ({_size(stats.sealed)} in {stats.chunks} "
            f"chunks + {_size(stats.manifests)} in signed manifests)",
            f"compression      {_size(stats.plain)} of unique data sealed into "
            f"{_size(stats.sealed)}: {_pct(stats.plain - stats.sealed, stats.plain)} saved",
            f"dedup            {stats.chunk_refs - stats.chunks} of {stats.chunk_refs} chunk "
            f"references were already stored, not stored or sent again: "
            f"{_size(stats.ref_plain - stats.plain)} saved",
        ]
    lines += [
        f"ingest           {ingest_rates(log, files, site.dropped_at)}",
        f"bytes sent       {_size(cloud_bytes)} in {cloud_files} cloud objects "
        f"({_pct(bytes_in - cloud_bytes, bytes_in)} less than the input)",
        f"windows used     {log.count('gate_open')} (cycle {CYCLE_OPEN} open, {CYCLE_CLOSED} "
        f"closed); {sent_while_closed(log, cloud)} objects sent while closed; "
        f"{log.count('upload_cut')} uploads cut by a closing window",
    ]
    reopened = second_window(log, files)
    if reopened:
        lines.append(f"second window    {reopened}")
    lines += [
        f"restore          {restore_json.get('objects_ok')} objects, "
        f"{_size(int(restore_json.get('bytes_ok') or 0))}, "
        f"{len(restore_json.get('problems') or [])} problems reported",
        f"elapsed          {t.total:.1f}s (generate {t.generate:.1f}s, sync {t.sync:.1f}s, "
        f"restore + compare {t.restore:.1f}s)",
    ]
    warnings = log.problems()
    if warnings:
        lines.append(f"daemon warnings  {len(warnings)}, e.g. {warnings[0]}")
    lines.append("")
    if problems:
        lines.append(f"FAIL: {len(problems)} differences")
        lines += [f"  - {p}" for p in problems[:50]]
        if len(problems) > 50:
            lines.append(f"  ... and {len(problems) - 50} more")
    else:
        lines.append(f"PASS: all {len(files)} files restored byte-identical")
    return "\n".join(lines)


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
    (work / MARKER).write_text("made by `python -m agent.demo`; wiped by its next run\n")


def run(work: Path, total: int, seed: int) -> tuple[bool, str]:
    """The whole demo; returns (passed, report)."""
    t0 = time.monotonic()
    prepare_workdir(work)
    originals, restored, cloud = work / "originals", work / "restored", work / "cloud"

    print(f"skyferry demo in {work}", flush=True)
    print("1/4 keys and config", flush=True)
    skyferry("keygen", "--out", str(work / "keys"), "--site", SITE)
    config = write_config(work)
    skyferry("check-config", str(config))

    print(f"2/4 generating {total} files (seed {seed})", flush=True)
    files = write_originals(originals, total, seed)
    print(f"  {len(files)} files, {_size(sum(f.size for f in files))}, in {originals}",
          flush=True)
    t1 = time.monotonic()

    print(f"3/4 syncing through the daemon (windows: {CYCLE_OPEN} open, {CYCLE_CLOSED} closed)",
          flush=True)
    site = Site(work, config)
    sync(site, files, originals)
    t2 = time.monotonic()

    print("4/4 restoring with `skyferry restore` and comparing", flush=True)
    r = subprocess.run(
        [sys.executable, "-m", "agent", "restore", "--backend", cloud.as_uri(), "--key",
         str(work / "keys" / "cloud" / "recipient.key"), "--to", str(restored), "--json",
         "--no-progress"],
        capture_output=True, text=True, timeout=300)
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

    stats = store_stats(work / "state")
    timings = Timings(t1 - t0, t2 - t1, t3 - t2, time.monotonic() - t0)
    return not problems, report(files, stats, site, restore_json, problems, timings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.demo", description=(
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
    print(text, flush=True)
    if passed and not args.keep:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
        print(f"(removed {work}; run with --keep to look around in it)")
    else:
        print(f"work folder kept: {work}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
