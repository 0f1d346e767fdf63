"""Issue 17 (large backlogs): what makes the queue's operations O(log n) keeps the store's
invariants. The running totals agree with the rows through every kind of change, restart and
rollback; an index from before schema 3 is upgraded in one transaction; a claim's walk inside an
object starts past what was sent and still takes chunks in order.

Objects are made by the real pipeline in tmp_path.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config.settings import ChunkingSettings, ClassSettings, CompressionSettings
from agent.errors import StoreError
from agent.format.crypto import EdgeKeys
from agent.format.keys import generate_keys, load_edge_keys
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest, IngestResult
from agent.store import schema, seqbook, totals
from agent.store.store import ChunkWork, ManifestWork, Store

CLASSES = (ClassSettings("critical", 0, "refuse"), ClassSettings("normal", 2, "evict-oldest"),
           ClassSettings("bulk", 3, "evict-oldest", ttl_s=60.0))
CHUNKING = ChunkingSettings(min_size=32 << 10, avg_size=64 << 10, max_size=128 << 10)
NO_AGING = 1e12


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> EdgeKeys:
    gen = generate_keys(tmp_path_factory.mktemp("keys"), "queue-site")
    return load_edge_keys(gen.edge_dir / "recipient.pub", gen.edge_dir / "site.key",
                          gen.edge_dir / "dedup.key")


class Env:
    """A store fed by the real pipeline (real chunking, sealing, fsync)."""

    def __init__(self, root: Path, keys: EdgeKeys, quota: int | None = None) -> None:
        self.root, self.keys, self.n = root, keys, 0
        self.state_dir = root / "state"
        self.reopen(quota, first=True)

    def reopen(self, quota: int | None = None, *, first: bool = False) -> None:
        if not first:
            self.store.close()
        self.store = Store(self.state_dir, CLASSES, quota)
        self.pipeline = Pipeline("queue-site", self.keys, self.store, CHUNKING,
                                 CompressionSettings())

    def ingest(self, priority: str, data: bytes) -> IngestResult:
        self.n += 1
        path = self.root / "src" / f"{priority}-{self.n}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.pipeline.ingest_file(IngestRequest(path, "files", path.name, priority))

    def chunk_ids(self, object_id: str) -> list[str]:
        """The object's chunks in order, with repeats (as its manifest lists them)."""
        return [r[0] for r in self.read("SELECT chunk_id FROM object_chunks WHERE object_id=? "
                                        "ORDER BY seq", (object_id,))]

    def read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        db = sqlite3.connect(f"file:{self.state_dir / 'index.sqlite'}?mode=ro", uri=True)
        try:
            return [tuple(r) for r in db.execute(sql, args)]
        finally:
            db.close()


def assert_accounting(store: Store) -> None:
    """The bytes the store counts are the bytes of its files."""
    files = [p for d in (store.chunks_dir, store.manifests_dir) for p in d.rglob("*")
             if p.is_file()]
    assert store.used_bytes == sum(p.stat().st_size for p in files)


@pytest.fixture
def env(tmp_path: Path, keys: EdgeKeys) -> Iterator[Env]:
    e = Env(tmp_path, keys)
    yield e
    e.store.close()


def counted(state_dir: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The totals as stored, and the same figures counted from the rows."""
    db = sqlite3.connect(f"file:{state_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        kept = (sorted(totals.object_rows(db)), sorted(totals.chunk_rows(db)))
        scanned = (sorted(r for r in db.execute(totals.SCAN_OBJECTS)),
                   sorted(r for r in db.execute(totals.SCAN_CHUNKS)))
    finally:
        db.close()
    return [*kept[0], *kept[1]], [*scanned[0], *scanned[1]]


def assert_totals_agree(env: Env) -> None:
    kept, scanned = counted(env.state_dir)
    assert kept == scanned


def test_totals_agree_with_the_rows_through_every_change(tmp_path: Path,
                                                         keys: EdgeKeys) -> None:
    env = Env(tmp_path, keys)
    try:
        rng = random.Random(17)
        shared = rng.randbytes(150_000)
        objs = [env.ingest(rng.choice(["critical", "normal", "bulk"]),
                           shared if i % 3 == 0 else rng.randbytes(rng.randint(1, 200_000)))
                for i in range(12)]
        assert_totals_agree(env)
        # Claims, a cut (release), acknowledgements, commits: the uplink's round.
        store = env.store
        first = store.next_work(time.time(), NO_AGING)
        assert isinstance(first, ChunkWork)
        store.release_chunk(first.chunk_id)
        assert_totals_agree(env)
        for _ in range(15):
            work = store.next_work(time.time(), NO_AGING)
            assert work is not None
            if isinstance(work, ChunkWork):
                store.mark_chunk_uploaded(work.chunk_id)
            else:
                store.mark_committed(work.object_id)
            assert_totals_agree(env)
        # An operator's reprioritisation, a damaged chunk, expiry, a restart.
        assert any(store.set_priority(o.object_id, "critical") for o in objs)
        work = store.next_work(time.time(), NO_AGING)
        assert isinstance(work, ChunkWork)
        assert store.mark_chunk_corrupt(work.chunk_id)
        assert_totals_agree(env)
        store.expire(time.time() + 3600)
        env.reopen()  # start-up: claims reset, used bytes counted
        assert_totals_agree(env)
        assert_accounting(env.store)
        for i in range(3):
            env.ingest("normal", random.Random(90 + i).randbytes(60_000))
        env.reopen(quota=env.store.used_bytes + 20_000)
        res = env.ingest("normal", random.Random(99).randbytes(60_000))
        assert res.evicted  # made room
        assert_totals_agree(env)
        assert_accounting(env.store)
        # A transaction that fails leaves totals and rows as they were.
        before = counted(env.state_dir)
        with pytest.raises(sqlite3.IntegrityError), env.store._index.txn() as db:
            db.execute("UPDATE objects SET state='committed' WHERE state='queued'")
            db.execute("INSERT INTO objects (id) VALUES (NULL)")
        assert counted(env.state_dir) == before
    finally:
        env.store.close()


def make_schema_2_index(state_dir: Path) -> None:
    """An index as schema 2 made it: schema 1's tables, the manifest numbering, no totals."""
    state_dir.mkdir(parents=True)
    db = sqlite3.connect(state_dir / "index.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(schema.SCHEMA + seqbook.SCHEMA)
    db.execute("ALTER TABLE objects ADD COLUMN seq INTEGER")
    db.execute("ALTER TABLE objects ADD COLUMN stream TEXT")
    db.execute(seqbook.INDEXES)
    db.execute("INSERT INTO meta VALUES ('schema', '2')")
    chunks = [("c1", "uploaded", 100, 0), ("c2", "sealed", 200, 1), ("c3", "uploading", 300, 1),
              ("c4", "uploaded", 400, 1), ("c5", "sealed", 500, 1)]
    db.executemany("INSERT INTO chunks (id, state, sealed_size, plain_size, sealed_hash, "
                   "has_file) VALUES (?, ?, ?, ?, 'h', ?)",
                   [(c, s, size, size * 2, f) for c, s, size, f in chunks])
    objects = [  # id, class, rank, state, chunks_left, created
        ("done", "normal", 2, "committed", 0, 10.0), ("ready", "bulk", 3, "queued", 0, 20.0),
        ("half", "normal", 2, "queued", 2, 30.0), ("urgent", "critical", 0, "queued", 1, 40.0),
        ("gone", "bulk", 3, "evicted", 1, 5.0)]
    db.executemany("INSERT INTO objects (id, source, class, rank, size, manifest_bytes, created, "
                   "state, chunks_left) VALUES (?, 'files', ?, ?, 1000, 70, ?, ?, ?)",
                   [(o, c, r, t, s, left) for o, c, r, s, left, t in objects])
    db.executemany("INSERT INTO object_chunks VALUES (?, ?, ?)", [
        ("done", 0, "c1"), ("ready", 0, "c4"), ("half", 0, "c1"), ("half", 1, "c4"),
        ("half", 2, "c3"), ("half", 3, "c2"), ("urgent", 0, "c5")])
    db.close()


def test_a_schema_2_store_is_upgraded_in_place(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_schema_2_index(state)
    store = Store(state, CLASSES)
    try:
        assert store.get_meta("schema") == "3"
        kept, scanned = counted(state)
        assert kept == scanned and kept
        # used bytes as schema 2 counted them: chunk files, and manifests of queued objects
        assert store.used_bytes == (200 + 300 + 400 + 500) + 3 * 70
        assert store.pending_objects() == 3
        summary = store.summary(100.0)
        assert summary["normal"].items == {"committed": 1, "queued": 1}
        assert summary["bulk"].items == {"queued": 1, "evicted": 1}
        assert summary["critical"].oldest_queued_age_s == 60.0
        assert store.chunk_counts()["sealed"] == (3, 1000)  # start-up put c3 back in line
        # The order is today's: the ready manifest, then critical, then the rest in seq order.
        order = []
        while (work := store.next_work(100.0, NO_AGING)) is not None:
            order.append(work.object_id if isinstance(work, ManifestWork) else work.chunk_id)
            if isinstance(work, ChunkWork):
                store.mark_chunk_uploaded(work.chunk_id)
            else:
                store.mark_committed(work.object_id)
        assert order == ["ready", "c5", "urgent", "c3", "c2", "half"]
    finally:
        store.close()
    assert counted(state)[0] == counted(state)[1]


def test_an_upgrade_cut_short_leaves_the_older_index(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    make_schema_2_index(state)
    real = totals.install

    def crash_after_install(db: sqlite3.Connection, *, rebuild: bool) -> None:
        real(db, rebuild=rebuild)
        raise KeyboardInterrupt  # stands in for the process dying mid-upgrade

    monkeypatch.setattr(totals, "install", crash_after_install)
    with pytest.raises(KeyboardInterrupt):
        Store(state, CLASSES)
    monkeypatch.undo()
    db = sqlite3.connect(state / "index.sqlite")
    try:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
        assert not totals.has_totals(db)
        columns = {r[1] for r in db.execute("PRAGMA table_info(objects)")}
        assert "unsent_from" not in columns
    finally:
        db.close()
    # the lock went with the failed open; the next start upgrades it
    with Store(state, CLASSES) as store:
        assert store.get_meta("schema") == "3" and store.pending_objects() == 3


def test_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state, CLASSES).close()
    db = sqlite3.connect(state / "index.sqlite")
    db.execute("UPDATE meta SET value='4' WHERE key='schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="has schema 4, this skyferry uses 3"):
        Store(state, CLASSES)


def test_read_only_status_of_a_schema_2_store_counts_the_rows(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_schema_2_index(state)
    with Store(state, CLASSES, read_only=True) as reader:
        assert reader.pending_objects() == 3
        assert reader.summary(100.0)["bulk"].items == {"queued": 1, "evicted": 1}
        assert reader.chunk_counts()["uploading"] == (1, 300)
    with Store(state, CLASSES) as writer:  # and the reader changed nothing
        assert writer.get_meta("schema") == "3"


def unsent_from(env: Env, object_id: str) -> int:
    return int(env.read("SELECT unsent_from FROM objects WHERE id=?", (object_id,))[0][0])


def test_claims_inside_an_object_start_past_what_was_sent(env: Env) -> None:
    res = env.ingest("normal", random.Random(3).randbytes(2_000_000))
    ids = env.chunk_ids(res.object_id)
    assert len(ids) >= 12
    store = env.store
    claims = [store.next_work(time.time(), NO_AGING) for _ in range(4)]
    assert [c.chunk_id for c in claims if isinstance(c, ChunkWork)] == ids[:4]
    # Acknowledged out of order: nothing moves until the first is in, then past all four.
    for c in (claims[1], claims[3], claims[2]):
        assert isinstance(c, ChunkWork)
        store.mark_chunk_uploaded(c.chunk_id)
        assert unsent_from(env, res.object_id) == 0
    assert isinstance(claims[0], ChunkWork)
    store.mark_chunk_uploaded(claims[0].chunk_id)
    assert unsent_from(env, res.object_id) == 4
    # A cut puts a claimed chunk back: it is claimed again before those after it.
    a, b = (store.next_work(time.time(), NO_AGING) for _ in range(2))
    assert isinstance(a, ChunkWork) and isinstance(b, ChunkWork)
    assert [a.chunk_id, b.chunk_id] == ids[4:6]
    store.release_chunk(a.chunk_id)
    again = store.next_work(time.time(), NO_AGING)
    assert isinstance(again, ChunkWork) and again.chunk_id == ids[4]
    store.mark_chunk_uploaded(b.chunk_id)
    # A restart keeps what was sent and puts the claim in flight back in line.
    env.reopen()
    store = env.store
    assert unsent_from(env, res.object_id) == 4
    sent = []
    while isinstance(work := store.next_work(time.time(), NO_AGING), ChunkWork):
        sent.append(work.chunk_id)
        store.mark_chunk_uploaded(work.chunk_id)
    assert sent == [ids[4], *ids[6:]]
    assert isinstance(work, ManifestWork)
    store.mark_committed(res.object_id)
    assert_accounting(store)


def test_a_window_budget_takes_a_smaller_chunk_a_little_further_on(env: Env) -> None:
    res = env.ingest("normal", random.Random(4).randbytes(2_000_000))
    ids = env.chunk_ids(res.object_id)
    size = {str(c): int(str(n)) for c, n in env.read("SELECT id, sealed_size FROM chunks")}
    mbytes = int(str(env.read("SELECT manifest_bytes FROM objects")[0][0]))
    # A budget one byte short of the first chunk: the first later chunk that fits is claimed.
    room = size[ids[0]] - 1
    fits = [c for c in ids[1:17] if size[c] <= room]
    assert fits, "test data: no smaller chunk among the next 16"
    work = env.store.next_work(time.time(), NO_AGING, room + mbytes, None)
    assert isinstance(work, ChunkWork) and work.chunk_id == fits[0]
    assert env.store.next_work(time.time(), NO_AGING, 0, None) is None


def test_an_object_whose_first_chunks_were_sent_with_another_starts_past_them(
        env: Env) -> None:
    data = random.Random(5).randbytes(1_500_000)
    first = env.ingest("normal", data)
    while (work := env.store.next_work(time.time(), NO_AGING)) is not None:
        if isinstance(work, ChunkWork):
            env.store.mark_chunk_uploaded(work.chunk_id)
        else:
            env.store.mark_committed(work.object_id)
    sent = set(env.chunk_ids(first.object_id))
    edited = env.ingest("normal", data + random.Random(6).randbytes(300_000))
    ids = env.chunk_ids(edited.object_id)
    start = next(i for i, c in enumerate(ids) if c not in sent)
    assert start >= 5 and unsent_from(env, edited.object_id) == start
    work = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(work, ChunkWork) and work.chunk_id == ids[start]
