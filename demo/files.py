"""The demo's files: sensor logs, CSV, JSON lines, imagery and a camera frame, generated from a
seed so every run sends the same bytes, and dropped into the spools like a producer would."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo import KiB, MiB

BASE_MTIME_NS = 1_795_000_000 * 10**9  # 2026-11-18 UTC: fixed, so runs are reproducible


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


def drop_into_spools(files: list[DemoFile], originals: Path,
                     spool: Callable[[str], Path]) -> None:
    """Copy like a well-behaved producer: temporary name, then rename into place."""
    for f in files:
        dest = spool(f.spool) / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copy2(originals / f.spool / f.name, tmp)
        os.replace(tmp, dest)
