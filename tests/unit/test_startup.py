"""Acceptance 8 of the core issue: start-up cost follows the index, not the backlog's bytes.

A synthetic backlog of 100,000 queued objects and 250,000 sealed chunks of ~4 MiB (about 1 TB
of queue) is written straight into the index; the chunk files do not exist, so any start-up
step that touched them would fail or show in the time. Opening the store (which reconciles),
the first `next_work()` and a `summary()` must together take under 5 s.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
import time
from pathlib import Path

from agent.config.settings import ClassSettings
from agent.store.store import ChunkWork, Store

OBJECTS = 100_000
CHUNKS = 250_000
UPLOADING = 3_000  # in flight when the previous run died
BUDGET_S = 5.0
CLASSES = (
    ClassSettings("critical", 0, "refuse"),
    ClassSettings("high", 1, "refuse"),
    ClassSettings("normal", 2, "evict-oldest"),
    ClassSettings("bulk", 3, "evict-oldest"),
)


def _hex(i: int, salt: bytes) -> str:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32, person=salt).hexdigest()


def build_backlog(state: Path, seed: int = 8) -> tuple[int, set[str]]:
    """Write the synthetic backlog; return its sealed bytes and the ids left 'uploading'."""
    Store(state, CLASSES).close()  # the real schema, created by the real code
    rng = random.Random(seed)
    now = time.time()
    chunk_ids = [_hex(i, b"chunk") for i in range(CHUNKS)]
    sizes = [rng.randint(3 << 20, 5 << 20) for _ in range(CHUNKS)]
    uploading = set(rng.sample(chunk_ids, UPLOADING))
    db = sqlite3.connect(state / "index.sqlite", isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-524288")  # 512 MiB: build without spilling to the WAL
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO chunks (id, state, sealed_size, plain_size, sealed_hash, attempts, "
            "has_file) VALUES (?, ?, ?, ?, ?, ?, 1)",
            ((cid, "uploading" if cid in uploading else "sealed", size + 60, size,
              _hex(i, b"sealed"), 1 if cid in uploading else 0)
             for i, (cid, size) in enumerate(zip(chunk_ids, sizes, strict=True))))
        # Objects of 2 or 3 chunks (250,000 over 100,000), in all classes, created over a day.
        links: list[tuple[str, int, str]] = []
        objects = []
        nxt = 0
        for i in range(OBJECTS):
            n = 3 if i < CHUNKS - 2 * OBJECTS else 2
            oid = f"{i:08x}-0000-7000-8000-{i:012x}"
            mine = range(nxt, nxt + n)
            nxt += n
            links += [(oid, seq, chunk_ids[c]) for seq, c in enumerate(mine)]
            cls = CLASSES[i % len(CLASSES)]
            objects.append((oid, "files", _hex(i, b"source"), cls.name, cls.rank,
                            sum(sizes[c] for c in mine), 700, now - 86400 + i * 0.8, n))
        assert nxt == CHUNKS
        db.executemany(
            "INSERT INTO objects (id, source, source_key, class, rank, size, manifest_bytes, "
            "created, state, chunks_left) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)", objects)
        db.executemany("INSERT INTO object_chunks (object_id, seq, chunk_id) VALUES (?, ?, ?)",
                       links)
        db.execute("COMMIT")
    finally:
        db.close()
    return sum(sizes) + 60 * CHUNKS + 700 * OBJECTS, uploading


def test_restart_with_1tb_backlog_index_is_ready_in_under_5s(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t_build = time.perf_counter()
    stored_bytes, uploading = build_backlog(state)
    t_build = time.perf_counter() - t_build

    t0 = time.perf_counter()
    store = Store(state, CLASSES)  # opens, checks the schema, reconciles
    t_open = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        work = store.next_work(time.time(), 6 * 3600.0)
        t_work = time.perf_counter() - t1
        t2 = time.perf_counter()
        summary = store.summary(time.time())
        t_summary = time.perf_counter() - t2
        total = t_open + t_work + t_summary
        print(f"\nstart-up with {OBJECTS} objects / {CHUNKS} chunks "
              f"({stored_bytes / 1e12:.2f} TB queued): open+reconcile {t_open:.3f} s, "
              f"first next_work {t_work:.3f} s, summary {t_summary:.3f} s, "
              f"total {total:.3f} s (index built in {t_build:.1f} s)")
        assert total < BUDGET_S, f"start-up took {total:.2f} s with a 1 TB backlog index"

        # It is ready: the most urgent chunk (oldest critical object, first chunk) is claimed.
        assert isinstance(work, ChunkWork)
        assert work.priority == "critical" and work.object_id == f"{0:08x}-0000-7000-8000-{0:012x}"
        assert not work.path.exists()  # start-up needed no chunk file, by construction
        assert store.pending_objects() == OBJECTS
        assert sum(s.items.get("queued", 0) for s in summary.values()) == OBJECTS
        assert sum(s.bytes.get("queued", 0) for s in summary.values()) > 0.9e12
        assert all(s.oldest_queued_age_s is not None for s in summary.values())
        assert store.used_bytes == stored_bytes

        # Reconcile put the in-flight uploads of the dead run back in line.
        counts = store.chunk_counts()
        assert counts["uploading"][0] == 1  # only the one next_work just claimed
        assert counts["sealed"][0] == CHUNKS - 1
        db = sqlite3.connect(f"file:{state / 'index.sqlite'}?mode=ro", uri=True)
        try:
            marks = ",".join("?" * len(uploading))
            states = db.execute(f"SELECT state, COUNT(*) FROM chunks WHERE id IN ({marks}) "
                                "GROUP BY state", tuple(uploading)).fetchall()
        finally:
            db.close()
        assert dict(states).get("sealed", 0) >= UPLOADING - 1, states
    finally:
        store.close()
