"""Deterministic test files of mixed kinds: text, CSV, JSON lines, random binary."""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["alpha", "bêta", "γάμμα", "데이터", "données", "naïve café", "日本", "x"]


def make_bytes(rng: random.Random, kind: str, size: int) -> bytes:
    if kind == "random":
        return rng.randbytes(size)
    if kind == "csv":
        rows, n = [], 0
        while n < size:
            row = f"{rng.randint(0, 10**9)},{rng.random():.6f},sensor-{rng.randint(0, 99)}\n"
            rows.append(row)
            n += len(row)
        return "".join(rows).encode()[:size]
    if kind == "jsonl":
        rows, n = [], 0
        while n < size:
            row = json.dumps({"t": rng.randint(0, 10**9), "v": rng.random(), "unit": "°C"}) + "\n"
            rows.append(row)
            n += len(row.encode())
        return "".join(rows).encode()[:size]
    words = ["satellite", "uplink", "camp", "sensor", "ferry", "window", "queue", "ü", "日"]
    text = " ".join(rng.choice(words) for _ in range(size // 4 + 1)).encode()
    return text[:size]


def sizes_for(count: int, rng: random.Random, big: list[int]) -> list[int]:
    """Mostly small files, a spread of medium ones, the given big ones, and the edge cases."""
    out = [1, 0, 4096, 1 << 20]
    out += big
    while len(out) < count:
        r = rng.random()
        out.append(rng.randint(1, 64 << 10) if r < 0.8 else rng.randint(64 << 10, 3 << 20))
    return out[:count]


def write_corpus(root: Path, count: int, seed: int, big: list[int]) -> dict[str, bytes]:
    """Create `count` files below root (nested, unicode names); return name -> content."""
    rng = random.Random(seed)
    kinds = ["random", "csv", "jsonl", "text"]
    files: dict[str, bytes] = {}
    for i, size in enumerate(sizes_for(count, rng, big)):
        kind = kinds[i % len(kinds)]
        depth = rng.randint(0, 3)
        folders = [f"{rng.choice(NAMES)}-{rng.randint(0, 3)}" for _ in range(depth)]
        ext = {"random": "bin", "csv": "csv", "jsonl": "jsonl", "text": "txt"}[kind]
        name = "/".join([*folders, f"{rng.choice(NAMES)}-{i:04d}.{ext}"])
        files[name] = make_bytes(rng, kind, size)
    return files
