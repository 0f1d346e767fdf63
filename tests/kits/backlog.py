"""A synthetic backlog written straight into a store's index, at any multiple of the start-up
test's (tests/unit/test_startup.py: 100,000 queued objects, 250,000 sealed chunks of ~4 MiB,
about 1 TB), and the uplink's round of claims and acknowledgements over it.

The schema is the store's own (a `Store` creates it); the rows are bulk-inserted in one
transaction with the secondary indexes dropped and rebuilt after, in key order: chunk ids are
spread over the key space like the hashes they stand for (an affine permutation of the chunk
numbers) but generated in id order, so a 40x index (4 M objects, 10 M chunks) builds in minutes.
The chunk files do not exist: nothing measured here may touch them.

Used by tests/unit/test_backlog_scale.py (the smoke version) and benchmarks/backlog.py.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from agent.config.settings import ClassSettings
from agent.store.store import ChunkWork, Store, Work

BASE_OBJECTS = 100_000
BASE_CHUNKS = 250_000
BASE_UPLOADING = 3_000  # left 'uploading' by the run that died (start-up resets them)
CLASSES = (
    ClassSettings("critical", 0, "refuse"),
    ClassSettings("high", 1, "refuse"),
    ClassSettings("normal", 2, "evict-oldest"),
    ClassSettings("bulk", 3, "evict-oldest"),
)
AGING_S = 6 * 3600.0  # the uplink's default
KEY_SPACE = 1 << 48  # chunk ids start with 12 hex digits spread over this
_MIX = 0x9E3779B1  # scatters neighbouring chunk numbers over the key space


@dataclass(frozen=True)
class Backlog:
    objects: int
    chunks: int
    uploading: int
    stored_bytes: int  # sealed chunk bytes plus manifests: what `used_bytes` must say
    build_s: float


def shape(scale: float) -> tuple[int, int, int]:
    """(objects, chunks, uploading) at `scale` times the start-up test."""
    return (round(BASE_OBJECTS * scale), round(BASE_CHUNKS * scale),
            max(1, round(BASE_UPLOADING * scale)))


def _coprime(n: int) -> int:
    a = _MIX % n or 1
    while _gcd(a, n) != 1:
        a += 1
    return a


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# SQL for the synthetic rows, generated inside SQLite (a 40x build makes 24 M rows).
_NUMBERS = "WITH RECURSIVE n(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM n WHERE k < :count - 1) "
_SIZE = "((3 << 20) + (({}) * 2654435761) % (2 << 20))"  # plain size of a chunk: 3-5 MiB
_CHUNK_ID = "printf('%012x%052x', (({c}) * :a % :chunks) * :spread, {c})"
_OBJECT_ID = "printf('%08x-0000-7000-8000-%012x', i, i)"
# The first `three` objects have 3 chunks, the rest 2; chunks are numbered in object order.
_OBJECTS = ("SELECT k AS i, CASE WHEN k < :three THEN 3 ELSE 2 END AS n, CASE WHEN k < :three "
            "THEN 3 * k ELSE 3 * :three + 2 * (k - :three) END AS f FROM n")

INSERT_CHUNKS = (
    # In id order: j is the position, c the chunk number (c = j / a mod chunks); the first
    # `uploading` in id order were in flight, scattered over the objects.
    _NUMBERS + "INSERT INTO chunks (id, state, sealed_size, plain_size, sealed_hash, attempts, "
    "has_file) SELECT printf('%012x%052x', j * :spread, c), CASE WHEN j < :uploading THEN "
    "'uploading' ELSE 'sealed' END, size + 60, size, printf('%064x', c), j < :uploading, 1 "
    f"FROM (SELECT j, c, {_SIZE.format('c')} AS size FROM "
    "(SELECT k AS j, k * :a_inv % :chunks AS c FROM n))")
INSERT_OBJECTS = (
    # In all classes (rank = i mod 4), oldest first, created over a day per 1x.
    _NUMBERS + "INSERT INTO objects (id, source, source_key, class, rank, size, manifest_bytes, "
    f"created, state, chunks_left) SELECT {_OBJECT_ID}, 'files', printf('%064x', i), "
    "CASE i % 4 WHEN 0 THEN :c0 WHEN 1 THEN :c1 WHEN 2 THEN :c2 ELSE :c3 END, i % 4, "
    f"{_SIZE.format('f')} + {_SIZE.format('f + 1')} + "
    f"CASE WHEN n = 3 THEN {_SIZE.format('f + 2')} ELSE 0 END, "
    f"700, :now - 86400 + i * 0.8, 'queued', n FROM ({_OBJECTS})")
INSERT_LINKS = (
    _NUMBERS + f"INSERT INTO object_chunks (object_id, seq, chunk_id) SELECT {_OBJECT_ID}, s, "
    f"{_CHUNK_ID.format(c='f + s')} FROM ({_OBJECTS}) CROSS JOIN "
    "(SELECT 0 AS s UNION ALL SELECT 1 UNION ALL SELECT 2) WHERE s < n")


def build(state: Path, scale: float = 1.0) -> Backlog:
    """Write the backlog into a new store at `state`."""
    started = time.perf_counter()
    objects, chunks, uploading = shape(scale)
    assert 2 * objects <= chunks <= 3 * objects
    assert [c.rank for c in CLASSES] == [0, 1, 2, 3]
    Store(state, CLASSES).close()  # the real schema, created by the real code
    a = _coprime(chunks)
    ids = {"a": a, "a_inv": pow(a, -1, chunks), "chunks": chunks, "spread": KEY_SPACE // chunks}
    db = sqlite3.connect(state / "index.sqlite", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=OFF")  # a failed build is thrown away whole
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-262144")  # 256 MiB
        indexes = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL AND "
            "tbl_name IN ('objects', 'chunks', 'object_chunks')").fetchall()
        db.execute("BEGIN")
        for name, _ in indexes:
            db.execute(f"DROP INDEX {name}")
        db.execute(INSERT_CHUNKS, {**ids, "count": chunks, "uploading": uploading})
        shape_args = {"count": objects, "three": chunks - 2 * objects}
        db.execute(INSERT_OBJECTS, {**shape_args, "now": time.time(),
                                    **{f"c{c.rank}": c.name for c in CLASSES}})
        db.execute(INSERT_LINKS, {**ids, **shape_args})
        for _, sql in indexes:
            db.execute(sql)
        sealed = db.execute("SELECT SUM(sealed_size) FROM chunks").fetchone()[0]
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    return Backlog(objects, chunks, uploading, int(sealed) + 700 * objects,
                   time.perf_counter() - started)


@dataclass
class Round:
    """Seconds each call took in one round of claims."""

    next_work: list[float] = field(default_factory=list)
    mark_sent: list[float] = field(default_factory=list)  # mark_chunk_uploaded
    committed: list[float] = field(default_factory=list)  # mark_committed
    manifests: int = 0

    def median_ms(self, what: str) -> float:
        return statistics.median(getattr(self, what)) * 1e3

    def p99_ms(self, what: str) -> float:
        values = sorted(getattr(self, what))
        return values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3


class Uplink:
    """What the uplink does to the store, without the network: claim the most urgent work
    with `streams` units in flight, acknowledge the oldest claim, claim again."""

    def __init__(self, store: Store, streams: int = 4) -> None:
        self.store = store
        self.streams = streams
        self.in_flight: deque[Work] = deque()
        self.round = Round()

    def step(self) -> Work | None:
        """One claim (acknowledging the oldest first when every stream is busy)."""
        if len(self.in_flight) >= self.streams:
            self._acknowledge(self.in_flight.popleft())
        t = time.perf_counter()
        work = self.store.next_work(time.time(), AGING_S)
        self.round.next_work.append(time.perf_counter() - t)
        if work is not None:
            self.in_flight.append(work)
        return work

    def _acknowledge(self, work: Work) -> None:
        t = time.perf_counter()
        if isinstance(work, ChunkWork):
            self.store.mark_chunk_uploaded(work.chunk_id)
            self.round.mark_sent.append(time.perf_counter() - t)
        else:
            self.store.mark_committed(work.object_id)
            self.round.committed.append(time.perf_counter() - t)
            self.round.manifests += 1
