"""Deterministic benchmark corpus: what an edge site produces, in the proportions of issue 6.

By bytes: JSON Lines telemetry ~40 %, CSV sensor series ~30 %, incompressible binary ~20 %,
semi-compressible binary records ~10 %. By size: thousands of 1-64 KiB files, tens of 1-10 MiB
files and a few 100+ MiB files at the default 1 GiB (sizes and counts scale with the size asked).
The same (size, seed) always gives byte-identical files, so runs on different days compare.
`python -m benchmarks.corpus` writes one from the command line.

A finished corpus carries a `.corpus.json` stamp; generating into a folder whose stamp matches
is a no-op, so benchmarks can reuse one corpus across runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.config.units import format_size

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
STAMP = ".corpus.json"
VERSION = 2  # bump whenever plan() or content() changes what is generated

# Share of the corpus bytes per kind, and per size class.
KINDS = {"jsonl": 0.40, "csv": 0.30, "bin": 0.20, "rec": 0.10}
CLASSES = {"small": 0.20, "medium": 0.35, "large": 0.45}


@dataclass(frozen=True)
class FileSpec:
    name: str  # relative POSIX path
    kind: str
    size: int
    seed: int


# ---- content ---------------------------------------------------------------------------------

_DEVICES = [f"dev-{i:03d}" for i in range(64)]
_LEVELS = ["info", "info", "info", "info", "warn", "debug", "error"]
_METRICS = ["temp_c", "humidity", "pressure_hpa", "battery_v", "rssi_dbm", "load", "flow_lpm"]


def _jsonl(rng: random.Random, size: int) -> Iterator[bytes]:
    """Telemetry events: repetitive keys, drifting timestamps and values (zstd ~5-8x)."""
    t = 1_760_000_000_000 + rng.randrange(10**9)
    seq = rng.randrange(10**6)
    done = 0
    while done < size:
        rows = []
        for _ in range(512):
            t += rng.randrange(5, 2000)
            seq += 1
            dev = rng.choice(_DEVICES)
            rows.append(
                f'{{"ts":{t},"seq":{seq},"site":"camp-north","device":"{dev}",'
                f'"level":"{rng.choice(_LEVELS)}","metric":"{rng.choice(_METRICS)}",'
                f'"value":{rng.gauss(20, 6):.3f},"fw":"2.4.{rng.randrange(4)}",'
                f'"ok":{"true" if rng.random() < 0.97 else "false"}}}\n')
        block = "".join(rows).encode()
        yield block
        done += len(block)


def _csv(rng: random.Random, size: int) -> Iterator[bytes]:
    """Sensor series: one timestamp column and slowly varying readings (zstd ~3-4x)."""
    t = 1_760_000_000 + rng.randrange(10**7)
    vals = [rng.uniform(-10, 40) for _ in range(6)]
    yield b"timestamp,sensor,ch0,ch1,ch2,ch3,ch4,ch5\n"
    done = 0
    sensor = rng.randrange(1000)
    while done < size:
        rows = []
        for _ in range(1024):
            t += 1
            vals = [v + rng.gauss(0, 0.05) for v in vals]
            rows.append(f"{t},s{sensor:04d}," + ",".join(f"{v:.4f}" for v in vals) + "\n")
        block = "".join(rows).encode()
        yield block
        done += len(block)


def _bin(rng: random.Random, size: int) -> Iterator[bytes]:
    """Already-compressed or encrypted payloads (images, archives): random bytes."""
    done = 0
    while done < size:
        n = min(MiB, size - done)
        yield rng.randbytes(n)
        done += n


_REC = struct.Struct("<QIHhff16s")  # 40-byte record: 16 random bytes of 40


def _rec(rng: random.Random, size: int) -> Iterator[bytes]:
    """Binary records, part structure part noise (zstd ~1.5-2x)."""
    t = rng.randrange(10**12)
    done = 0
    while done < size:
        out = bytearray()
        for _ in range(4096):
            t += rng.randrange(1, 100)
            out += _REC.pack(t, rng.randrange(256), rng.randrange(16), rng.randrange(-300, 300),
                             rng.gauss(0, 1), rng.random(), rng.randbytes(16))
        yield bytes(out)
        done += len(out)


_GEN = {"jsonl": _jsonl, "csv": _csv, "bin": _bin, "rec": _rec}
_EXT = {"jsonl": "jsonl", "csv": "csv", "bin": "bin", "rec": "dat"}


def content(spec: FileSpec) -> Iterator[bytes]:
    """The bytes of one file, in blocks, exactly `spec.size` long."""
    left = spec.size
    for block in _GEN[spec.kind](random.Random(spec.seed), spec.size):
        if left <= 0:
            return
        yield block[:left]
        left -= min(len(block), left)


# ---- layout ----------------------------------------------------------------------------------

def plan(total: int, seed: int = 6) -> list[FileSpec]:
    """Every file of the corpus: name, kind, size and content seed."""
    rng = random.Random(seed)
    scale = total / GiB
    # Size ranges scale with the corpus so a small corpus keeps the same shape.
    ranges = {
        "small": (KiB, 64 * KiB),
        "medium": (max(64 * KiB, int(MiB * scale)), max(128 * KiB, int(10 * MiB * scale))),
    }
    budgets = {(c, k): int(total * cs * ks) for c, cs in CLASSES.items() for k, ks in KINDS.items()}
    budgets["large", "jsonl"] += total - sum(budgets.values())  # rounding: exactly `total`
    specs: list[FileSpec] = []
    for cls in CLASSES:
        for kind in KINDS:
            budget = budgets[cls, kind]
            if cls == "large":
                sizes = [budget]  # one big file per kind: 184, 138, 92, 46 MiB at 1 GiB
            else:
                lo, hi = ranges[cls]
                sizes, left = [], budget
                while left > 0:
                    n = min(left, rng.randint(lo, hi))
                    sizes.append(n)
                    left -= n
            for i, n in enumerate(sizes):
                folder = f"{cls}/{kind}/{i // 500:03d}" if cls == "small" else f"{cls}/{kind}"
                specs.append(FileSpec(f"{folder}/{kind}-{i:05d}.{_EXT[kind]}", kind, n,
                                      rng.randrange(2**63)))
    return specs


def _stamp(total: int, seed: int) -> dict[str, int]:
    return {"version": VERSION, "size": total, "seed": seed}


def generate(out: Path, total: int = GiB, seed: int = 6) -> list[FileSpec]:
    """Write the corpus below `out` unless an identical one is already there."""
    specs = plan(total, seed)
    stamp = out / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == _stamp(total, seed):
        return specs
    if out.exists():
        shutil.rmtree(out)
    for spec in specs:
        path = out / spec.name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for block in content(spec):
                f.write(block)
    stamp.write_text(json.dumps(_stamp(total, seed)))
    return specs


def files(root: Path) -> list[Path]:
    """The corpus files below root, sorted (the stamp excluded)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != STAMP)


@dataclass(frozen=True)
class EditReport:
    files: int
    bytes_changed: int
    corpus_bytes: int


def edit(root: Path, fraction: float = 0.01, seed: int = 61, region: int = 4 * KiB) -> EditReport:
    """Edit `fraction` of the files in place: overwrite one `region` at a random offset each.

    Every size class is edited (at least one file of each, so the big files' re-send cost is
    measured too); the edited files get a new mtime, as a producer rewriting them would.
    """
    rng = random.Random(seed)
    by_class: dict[str, list[Path]] = {}
    for p in files(root):
        by_class.setdefault(p.relative_to(root).parts[0], []).append(p)
    chosen: list[Path] = []
    for paths in by_class.values():
        chosen += rng.sample(paths, max(1, round(len(paths) * fraction)))
    changed = 0
    for p in chosen:
        size = p.stat().st_size
        n = min(region, size)
        at = rng.randrange(size - n + 1)
        with open(p, "r+b") as f:
            f.seek(at)
            f.write(rng.randbytes(n))
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        changed += n
    return EditReport(len(chosen), changed, sum(p.stat().st_size for p in files(root)))


def describe(specs: list[FileSpec]) -> str:
    """One line: counts per size class and byte shares per kind."""
    total = sum(s.size for s in specs) or 1
    per_cls: dict[str, list[int]] = {}
    for s in specs:
        per_cls.setdefault(s.name.split("/", 1)[0], []).append(s.size)
    kinds = {k: sum(s.size for s in specs if s.kind == k) / total for k in KINDS}
    cls = ", ".join(f"{len(v)} {c} ({format_size(min(v))}-{format_size(max(v))})"
                    for c, v in per_cls.items())
    mix = ", ".join(f"{k} {v:.0%}" for k, v in kinds.items())
    return f"{format_size(total)} in {len(specs)} files: {cls}; {mix}"
