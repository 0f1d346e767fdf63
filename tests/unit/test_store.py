"""agent.store.store: states, deletion after commit, dedup, work order, quota, TTL, locking.

Objects are made by the real pipeline (real chunking, sealing and fsync) in tmp_path.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.config.settings import (
    DEFAULT_CLASSES,
    ChunkingSettings,
    ClassSettings,
    CompressionSettings,
)
from agent.errors import QuotaExceededError, StoreError, StoreLockedError
from agent.format import crypto
from agent.format.codec import decompress
from agent.format.keys import generate_keys, load_edge_keys, load_recipient_private
from agent.format.manifest import Manifest
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest, IngestResult
from agent.store.store import ChunkWork, Eviction, ManifestWork, Store

SITE = "store-site"
CHUNKING = ChunkingSettings(min_size=32 << 10, avg_size=64 << 10, max_size=128 << 10)
NO_AGING = 1e12
OBJ = 20_000  # bytes of a typical test object: below min_size, so one chunk


@dataclass(frozen=True)
class Keys:
    edge: crypto.EdgeKeys
    recipient: X25519PrivateKey


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    gen = generate_keys(tmp_path_factory.mktemp("keys"), SITE)
    edge = load_edge_keys(gen.edge_dir / "recipient.pub", gen.edge_dir / "site.key",
                          gen.edge_dir / "dedup.key")
    return Keys(edge, load_recipient_private(gen.cloud_dir / "recipient.key"))


@dataclass
class Env:
    root: Path
    keys: Keys
    classes: tuple[ClassSettings, ...] = DEFAULT_CLASSES
    quota: int | None = None
    store: Store = field(init=False)
    pipeline: Pipeline = field(init=False)
    _seq: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.open()

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def open(self) -> None:
        self.store = Store(self.state_dir, self.classes, self.quota)
        self.pipeline = Pipeline(SITE, self.keys.edge, self.store, CHUNKING,
                                 CompressionSettings())

    def reopen(self, quota: int | None = None) -> None:
        self.store.close()
        self.quota = quota
        self.open()

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def ingest(self, priority: str = "normal", data: bytes | None = None,
               name: str | None = None) -> IngestResult:
        n = next(self._seq)
        name = name or f"{priority}-{n}.bin"
        if data is None:
            data = random.Random(n).randbytes(OBJ)
        path = self.write(name, data)
        return self.pipeline.ingest_file(IngestRequest(path, "files", name, priority))

    def chunk_ids(self, object_id: str) -> list[str]:
        blob = self.store.manifest_path(object_id).read_bytes()
        header, payload = crypto.open_sealed(blob, self.keys.recipient)
        signed = decompress(header.compression, payload, header.plaintext_len)
        body = signed[crypto.SIGNATURE_SIZE:]
        return [c.id for c in Manifest.from_json(body).chunks]

    def states(self, cls: str) -> dict[str, int]:
        return self.store.summary(time.time())[cls].items

    def upload_all(self, object_id: str) -> None:
        """What the uplink does for one object: every chunk, then the manifest."""
        while True:
            work = self.store.next_work(time.time(), NO_AGING)
            assert work is not None
            assert work.object_id == object_id, "another object came first"
            if isinstance(work, ManifestWork):
                self.store.mark_committed(object_id)
                return
            self.store.mark_chunk_uploaded(work.chunk_id)


@pytest.fixture
def env(tmp_path: Path, keys: Keys) -> Iterator[Env]:
    e = Env(tmp_path, keys)
    yield e
    e.store.close()


def files_under(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file()}


def disk_bytes(store: Store) -> int:
    return sum(files_under(store.chunks_dir).values()) + sum(
        files_under(store.manifests_dir).values())


def queue_files(store: Store) -> dict[str, int]:
    """Everything the queue holds on disk except the SQLite files and the lock."""
    return {k: v for k, v in files_under(store.state_dir).items()
            if not k.startswith(("index.sqlite", "lock"))}


def assert_accounting(store: Store) -> None:
    assert store.used_bytes == disk_bytes(store)
    assert list(store.staging_dir.iterdir()) == []


def has_files(store: Store, object_id: str, chunk_ids: Iterable[str]) -> list[bool]:
    return [store.manifest_path(object_id).exists(),
            *(store.chunk_path(c).exists() for c in chunk_ids)]


# ---- states and invariant 4 ---------------------------------------------------------------


def test_chunk_and_object_state_transitions(env: Env) -> None:
    data = random.Random(10).randbytes(200_000)
    res = env.ingest("normal", data)
    ids = env.chunk_ids(res.object_id)
    n = len(set(ids))
    assert n >= 2 and res.new_chunks == n
    counts = env.store.chunk_counts()
    assert list(counts) == ["sealed"] and counts["sealed"][0] == n
    assert env.states("normal") == {"queued": 1}
    assert env.store.pending_objects() == 1

    first = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(first, ChunkWork) and first.chunk_id == ids[0]
    assert first.path == env.store.chunk_path(ids[0]) and first.priority == "normal"
    assert crypto.content_hash(first.path.read_bytes()) == first.sealed_hash
    assert env.store.chunk_counts()["uploading"][0] == 1
    env.store.release_chunk(first.chunk_id)  # a cut: back in line, at the front
    assert "uploading" not in env.store.chunk_counts()
    again = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(again, ChunkWork) and again.chunk_id == ids[0]

    sent = []
    work: ChunkWork | ManifestWork | None = again
    while isinstance(work, ChunkWork):
        sent.append(work.chunk_id)
        env.store.mark_chunk_uploaded(work.chunk_id)
        # Invariant 4: uploaded chunks stay on disk until the manifest is acknowledged.
        assert work.path.exists()
        work = env.store.next_work(time.time(), NO_AGING)
    assert sent == list(dict.fromkeys(ids))  # in object order, each once
    assert isinstance(work, ManifestWork) and work.object_id == res.object_id
    assert env.store.chunk_counts() == {"uploaded": (n, env.store.chunk_counts()["uploaded"][1])}
    assert env.states("normal") == {"queued": 1}
    assert all(has_files(env.store, res.object_id, ids))
    assert env.store.next_work(time.time(), NO_AGING) is None  # the manifest is in flight
    env.store.release_manifest(res.object_id)
    work = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(work, ManifestWork) and work.path.exists()
    assert_accounting(env.store)

    env.store.mark_committed(res.object_id)
    assert env.states("normal") == {"committed": 1}
    assert env.store.pending_objects() == 0
    assert not any(has_files(env.store, res.object_id, ids))
    assert env.store.chunk_counts()["uploaded"][0] == n  # the rows stay: dedup with the cloud
    assert env.store.used_bytes == 0
    assert_accounting(env.store)
    assert env.store.next_work(time.time(), NO_AGING) is None


def test_shared_chunk_kept_until_every_object_is_committed(env: Env) -> None:
    head = random.Random(11).randbytes(300_000)
    a = env.ingest("normal", head)
    b = env.ingest("normal", head + random.Random(12).randbytes(100_000))
    ids_a, ids_b = env.chunk_ids(a.object_id), env.chunk_ids(b.object_id)
    shared = set(ids_a) & set(ids_b)
    assert len(shared) >= len(ids_a) - 1 >= 2
    assert b.new_chunks == len(set(ids_b) - shared)

    env.upload_all(a.object_id)
    for c in ids_a:  # needed by b, which is still queued
        assert env.store.chunk_path(c).exists() == (c in shared), c
    assert not env.store.manifest_path(a.object_id).exists()
    assert all(has_files(env.store, b.object_id, ids_b))
    assert_accounting(env.store)

    # b's shared chunks were acknowledged with a: only its own chunks are sent.
    sent = []
    while isinstance(work := env.store.next_work(time.time(), NO_AGING), ChunkWork):
        sent.append(work.chunk_id)
        env.store.mark_chunk_uploaded(work.chunk_id)
    assert set(sent) == set(ids_b) - shared
    assert isinstance(work, ManifestWork) and work.object_id == b.object_id
    assert all(env.store.chunk_path(c).exists() for c in shared)
    env.store.mark_committed(b.object_id)
    assert files_under(env.store.chunks_dir) == {}
    assert files_under(env.store.manifests_dir) == {}
    assert_accounting(env.store)


def test_identical_objects_share_every_chunk(env: Env) -> None:
    data = random.Random(13).randbytes(150_000)
    a = env.ingest("normal", data, name="a.bin")
    b = env.ingest("normal", data, name="b.bin")
    ids = env.chunk_ids(a.object_id)
    assert env.chunk_ids(b.object_id) == ids
    assert b.new_chunks == 0
    assert b.stored_bytes == env.store.manifest_path(b.object_id).stat().st_size
    assert len(files_under(env.store.chunks_dir)) == len(set(ids))
    assert env.store.chunk_counts()["sealed"][0] == len(set(ids))
    assert all(env.store.chunk_known(c) for c in ids)
    assert not env.store.chunk_known("0" * 64)

    # Uploading a's chunks completes b's too: both manifests are ready, oldest first.
    while isinstance(work := env.store.next_work(time.time(), NO_AGING), ChunkWork):
        assert work.object_id == a.object_id
        env.store.mark_chunk_uploaded(work.chunk_id)
    assert isinstance(work, ManifestWork) and work.object_id == a.object_id
    env.store.mark_committed(a.object_id)
    assert all(env.store.chunk_path(c).exists() for c in ids)  # b still needs them
    work = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(work, ManifestWork) and work.object_id == b.object_id
    env.store.mark_committed(b.object_id)
    assert files_under(env.store.chunks_dir) == {}
    assert_accounting(env.store)

    # Already in the cloud: a third copy stores no chunk and sends only its manifest.
    c = env.ingest("normal", data, name="c.bin")
    assert c.new_chunks == 0 and files_under(env.store.chunks_dir) == {}
    assert all(env.store.chunk_known(i) for i in ids)
    work = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(work, ManifestWork) and work.object_id == c.object_id


def test_accepted_source_key_returns_the_existing_object(env: Env) -> None:
    data = random.Random(14).randbytes(OBJ)
    first = env.ingest("normal", data, name="obs.bin")
    path = env.root / "src" / "obs.bin"
    st = path.stat()
    key = env.pipeline.source_key("files", "obs.bin", st.st_size, st.st_mtime_ns)
    assert env.store.accepted_source_key(key) == first.object_id
    assert env.store.accepted_source_key(env.pipeline.source_key(
        "files", "obs.bin", st.st_size, st.st_mtime_ns + 1)) is None

    again = env.pipeline.ingest_file(IngestRequest(path, "files", "obs.bin", "normal"))
    assert again.duplicate_of == first.object_id == again.object_id
    assert again.stored_bytes == 0
    assert env.store.pending_objects() == 1
    env.upload_all(first.object_id)
    assert env.store.accepted_source_key(key) == first.object_id  # committed counts too

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new version of the file
    newer = env.pipeline.ingest_file(IngestRequest(path, "files", "obs.bin", "normal"))
    assert newer.duplicate_of is None and newer.object_id != first.object_id


# ---- work order -----------------------------------------------------------------------------


def test_next_work_serves_classes_by_rank_then_age(env: Env) -> None:
    order = ["bulk", "normal", "critical", "normal", "high"]
    made = [(p, env.ingest(p).object_id) for p in order]
    claimed = []
    while (work := env.store.next_work(time.time(), NO_AGING)) is not None:
        assert isinstance(work, ChunkWork)
        claimed.append((work.priority, work.object_id))
    by_id = dict((oid, p) for p, oid in made)
    expected = sorted(made, key=lambda m: (
        next(c.rank for c in DEFAULT_CLASSES if c.name == m[0]), made.index(m)))
    assert claimed == expected
    assert [p for p, _ in claimed] == ["critical", "high", "normal", "normal", "bulk"]

    for _, oid in reversed(claimed):  # acknowledged in reverse: manifests still by rank, age
        for cid in env.chunk_ids(oid):
            env.store.mark_chunk_uploaded(cid)
    manifests = []
    while (work := env.store.next_work(time.time(), NO_AGING)) is not None:
        assert isinstance(work, ManifestWork)
        manifests.append(work.object_id)
        assert work.priority == by_id[work.object_id]
    assert manifests == [oid for _, oid in expected]


def test_ready_manifest_goes_before_any_chunk(env: Env) -> None:
    bulk = env.ingest("bulk")
    work = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(work, ChunkWork) and work.object_id == bulk.object_id
    env.store.mark_chunk_uploaded(work.chunk_id)
    alarm = env.ingest("critical")
    first = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(first, ManifestWork) and first.object_id == bulk.object_id
    second = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(second, ChunkWork) and second.object_id == alarm.object_id


def test_aging_promotes_an_old_bulk_object(env: Env) -> None:
    old = env.ingest("bulk")
    time.sleep(0.05)
    new = env.ingest("normal")
    now = time.time()
    ages = env.store.summary(now)
    old_age, new_age = ages["bulk"].oldest_queued_age_s, ages["normal"].oldest_queued_age_s
    assert old_age is not None and new_age is not None
    gap = old_age - new_age
    assert gap > 0
    far = now + 1e6  # both have waited ~11 days: what matters is who waited longer

    work = env.store.next_work(far, aging_s=NO_AGING)
    assert isinstance(work, ChunkWork) and work.object_id == new.object_id
    env.store.release_chunk(work.chunk_id)
    work = env.store.next_work(far, aging_s=gap / 3)  # old waited 3 aging periods longer
    assert isinstance(work, ChunkWork) and work.object_id == old.object_id
    env.store.release_chunk(work.chunk_id)
    work = env.store.next_work(far, aging_s=gap * 2)  # half a period: not enough to climb
    assert isinstance(work, ChunkWork) and work.object_id == new.object_id


# ---- quota ----------------------------------------------------------------------------------


def need_for(env: Env, size: int) -> int:
    """What the store reserves for an object of `size` bytes (measured, then given back)."""
    need, evicted = env.store.reserve(size, "normal", CHUNKING.max_size)
    env.store.release(need)
    assert evicted == []
    return need


def snapshot(env: Env) -> tuple[object, ...]:
    s = env.store
    return (queue_files(s), s.used_bytes, s.chunk_counts(),
            {k: v.items for k, v in s.summary(0.0).items()}, s.pending_objects())


def test_refuse_raises_and_changes_nothing(env: Env) -> None:
    held = [env.ingest("critical").object_id, env.ingest("high").object_id]
    env.reopen(quota=env.store.used_bytes + 10_000)
    before = snapshot(env)
    for cls in ("critical", "high", "normal", "bulk"):
        src = env.write(f"{cls}.bin", random.Random(cls).randbytes(OBJ))
        with pytest.raises(QuotaExceededError, match=f"quota .* class '{cls}'"):
            env.pipeline.ingest_file(IngestRequest(src, "files", f"{cls}.bin", cls))
        assert src.exists()
        assert snapshot(env) == before
    with pytest.raises(QuotaExceededError):
        env.store.reserve(OBJ, "critical", CHUNKING.max_size)
    assert snapshot(env) == before
    assert all(env.store.manifest_path(o).exists() for o in held)
    # Small enough to fit: accepted without evicting anything.
    small = env.ingest("critical", b"tiny alarm")
    assert small.evicted == () and env.states("critical") == {"queued": 2}
    assert_accounting(env.store)


def test_evict_oldest_of_the_lowest_class_never_a_refuse_class(env: Env) -> None:
    need = need_for(env, OBJ)
    b1 = env.ingest("bulk").object_id
    n1 = env.ingest("normal").object_id
    b2 = env.ingest("bulk").object_id
    c1 = env.ingest("critical").object_id
    h1 = env.ingest("high").object_id
    # Room for a little less than one more object: each arrival must evict exactly one.
    env.reopen(quota=env.store.used_bytes + need - 1000)
    assert_accounting(env.store)

    def arrive(cls: str, victim: str, victim_cls: str) -> str:
        victim_chunks = env.chunk_ids(victim)
        assert all(has_files(env.store, victim, victim_chunks))
        res = env.ingest(cls)
        assert res.evicted == (Eviction(victim, victim_cls, OBJ, "quota"),)
        assert not any(has_files(env.store, victim, victim_chunks)), victim
        assert env.quota is not None and env.store.used_bytes <= env.quota
        assert_accounting(env.store)
        return res.object_id

    n2 = arrive("normal", b1, "bulk")  # lowest class first, oldest within it
    n3 = arrive("normal", b2, "bulk")
    n4 = arrive("normal", n1, "normal")  # same class may go when the class is evict-oldest
    arrive("high", n2, "normal")  # a refuse class may evict lower evict-oldest classes ...
    arrive("critical", n3, "normal")
    before = snapshot(env)
    with pytest.raises(QuotaExceededError):  # ... but bulk cannot evict anything above it
        env.ingest("bulk")
    assert snapshot(env) == before
    n5 = arrive("normal", n4, "normal")
    arrive("critical", n5, "normal")
    before = snapshot(env)
    for cls in ("critical", "high", "normal", "bulk"):  # only refuse classes remain
        with pytest.raises(QuotaExceededError):
            env.ingest(cls)
        assert snapshot(env) == before
    assert env.states("critical") == {"queued": 3}
    assert env.states("high") == {"queued": 2}
    assert env.states("bulk") == {"evicted": 2}
    assert env.states("normal") == {"evicted": 5}
    for oid in (c1, h1):
        assert all(has_files(env.store, oid, env.chunk_ids(oid)))
    assert_accounting(env.store)


def test_refused_object_does_not_evict_in_vain(env: Env) -> None:
    """Evicting only pays when it makes room: otherwise nothing may be dropped."""
    env.ingest("bulk")
    env.ingest("critical")
    env.reopen(quota=env.store.used_bytes + 10_000)
    before = snapshot(env)
    big = random.Random(20).randbytes(5 * OBJ)  # more than evicting the bulk object frees
    with pytest.raises(QuotaExceededError):
        env.ingest("critical", big)
    assert snapshot(env) == before
    with pytest.raises(QuotaExceededError):  # larger than the whole quota
        env.ingest("bulk", random.Random(21).randbytes(env.store.quota_bytes or 0))
    assert snapshot(env) == before
    assert env.states("bulk") == {"queued": 1}
    assert_accounting(env.store)


def test_eviction_frees_only_what_no_protected_object_shares(env: Env) -> None:
    shared = random.Random(22).randbytes(OBJ)
    env.ingest("bulk", shared, name="copy-bulk.bin")
    env.ingest("critical", shared, name="copy-critical.bin")
    env.reopen(quota=env.store.used_bytes + 10_000)
    before = snapshot(env)
    # Evicting the bulk copy would free its manifest only: the chunk stays for critical.
    with pytest.raises(QuotaExceededError):
        env.ingest("normal")
    assert snapshot(env) == before


def test_several_objects_are_evicted_when_one_is_not_enough(env: Env) -> None:
    need_big = need_for(env, 3 * OBJ)
    olds = [env.ingest("bulk").object_id for _ in range(4)]
    env.ingest("critical")
    env.reopen(quota=env.store.used_bytes + need_big - 2 * OBJ - 100)
    res = env.ingest("normal", random.Random(23).randbytes(3 * OBJ))
    assert [e.object_id for e in res.evicted] == olds[:2]
    assert env.states("bulk") == {"evicted": 2, "queued": 2}
    assert_accounting(env.store)


def test_used_bytes_follow_commits_evictions_and_restarts(env: Env) -> None:
    assert env.store.used_bytes == 0
    objs = [env.ingest(p) for p in ("bulk", "normal", "high")]
    assert env.store.used_bytes == sum(r.stored_bytes for r in objs)
    assert_accounting(env.store)
    env.upload_all(objs[2].object_id)
    assert env.store.used_bytes == sum(r.stored_bytes for r in objs[:2])
    assert_accounting(env.store)
    used = env.store.used_bytes
    work = env.store.next_work(time.time(), NO_AGING)  # in flight when the process dies
    assert isinstance(work, ChunkWork)
    env.reopen()
    assert env.store.used_bytes == used
    assert "uploading" not in env.store.chunk_counts()  # in-flight uploads are retried
    again = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(again, ChunkWork) and again.chunk_id == work.chunk_id
    assert_accounting(env.store)


def test_commit_of_a_manifest_in_flight_while_evicted_counts_once(env: Env) -> None:
    """The uplink may finish a manifest after a quota eviction dropped its object."""
    need = need_for(env, OBJ)
    victim = env.ingest("bulk").object_id
    keep = env.ingest("critical").object_id
    env.reopen(quota=env.store.used_bytes + need - 1000)
    work = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(work, ChunkWork) and work.object_id == keep
    env.store.release_chunk(work.chunk_id)
    for cid in env.chunk_ids(victim):
        env.store.mark_chunk_uploaded(cid)
    manifest = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(manifest, ManifestWork) and manifest.object_id == victim
    res = env.ingest("normal")
    assert [e.object_id for e in res.evicted] == [victim]
    env.store.mark_committed(victim)  # the upload had already read the manifest
    assert_accounting(env.store)
    env.reopen(quota=env.quota)
    assert_accounting(env.store)


# ---- TTL, corruption ------------------------------------------------------------------------


def test_ttl_expiry(tmp_path: Path, keys: Keys) -> None:
    classes = (ClassSettings("critical", 0, "refuse"),
               ClassSettings("normal", 2, "evict-oldest", ttl_s=3600.0),
               ClassSettings("bulk", 3, "evict-oldest", ttl_s=60.0))
    env = Env(tmp_path, keys, classes)
    try:
        shared = random.Random(30).randbytes(OBJ)
        b = env.ingest("bulk", shared)
        n = env.ingest("normal")
        c = env.ingest("critical", shared, name="same-bytes.bin")
        now = time.time()
        assert env.store.expire(now) == []
        assert env.store.expire(now + 30) == []
        assert env.store.expire(now + 120) == [Eviction(b.object_id, "bulk", OBJ, "ttl")]
        assert env.states("bulk") == {"expired": 1}
        assert not env.store.manifest_path(b.object_id).exists()
        ids = env.chunk_ids(c.object_id)
        assert all(env.store.chunk_path(i).exists() for i in ids)  # critical still needs them
        assert_accounting(env.store)
        assert env.store.expire(now + 7200) == [Eviction(n.object_id, "normal", OBJ, "ttl")]
        assert env.store.expire(now + 10**9) == []  # critical has no TTL
        assert env.states("critical") == {"queued": 1}
        assert env.store.pending_objects() == 1
        assert_accounting(env.store)
    finally:
        env.store.close()


def test_corrupt_chunk_marks_its_objects_damaged(env: Env) -> None:
    data = random.Random(40).randbytes(OBJ)
    a = env.ingest("normal", data, name="a.bin")
    b = env.ingest("bulk", data, name="b.bin")
    other = env.ingest("normal")
    (cid,) = env.chunk_ids(a.object_id)
    assert sorted(env.store.mark_chunk_corrupt(cid)) == sorted([a.object_id, b.object_id])
    assert env.states("normal") == {"damaged": 1, "queued": 1}
    assert env.states("bulk") == {"damaged": 1}
    # Damaged objects can never complete: their files are released like an eviction's.
    assert not env.store.chunk_path(cid).exists()
    assert not env.store.manifest_path(a.object_id).exists()
    assert not env.store.chunk_known(cid)
    assert env.store.used_bytes == disk_bytes(env.store)
    work = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(work, ChunkWork) and work.object_id == other.object_id
    assert env.store.next_work(time.time(), NO_AGING) is None

    # The source still has the bytes: ingesting them again seals a fresh copy of the chunk.
    again = env.ingest("normal", data, name="a-again.bin")
    assert again.new_chunks == 1 and env.chunk_ids(again.object_id) == [cid]
    assert env.store.chunk_known(cid)
    work = env.store.next_work(time.time(), NO_AGING)
    assert isinstance(work, ChunkWork) and work.chunk_id == cid


# ---- locking --------------------------------------------------------------------------------


def test_second_writer_is_refused(env: Env) -> None:
    with pytest.raises(StoreLockedError, match="in use by another skyferry process"):
        Store(env.state_dir, DEFAULT_CLASSES)
    env.ingest("normal")  # the first writer is unaffected
    env.store.close()
    other = Store(env.state_dir, DEFAULT_CLASSES)  # the lock went with the writer
    assert other.pending_objects() == 1
    env.store = other


def test_read_only_store_works_while_the_writer_holds_the_lock(env: Env) -> None:
    first = env.ingest("high")
    env.store.set_meta("cycle_anchor", "12.5")
    reader = Store(env.state_dir, DEFAULT_CLASSES, read_only=True)
    try:
        assert reader.pending_objects() == 1
        assert reader.summary(time.time())["high"].items == {"queued": 1}
        assert reader.chunk_counts()["sealed"][0] == first.new_chunks
        assert reader.get_meta("cycle_anchor") == "12.5"
        assert reader.accepted_source_key("nothing") is None
        env.ingest("bulk")  # the writer keeps writing; the reader sees it
        assert reader.pending_objects() == 2
    finally:
        reader.close()
    env.ingest("normal")
    assert env.store.pending_objects() == 3


def test_read_only_store_needs_an_existing_index(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no skyferry store"):
        Store(tmp_path / "nowhere", DEFAULT_CLASSES, read_only=True)
    assert not (tmp_path / "nowhere").exists()


def test_the_urgent_stream_claims_only_the_most_urgent_class(env: Env) -> None:
    """`max_rank` (the uplink's stream kept for critical data): bulk work is never claimed
    through it, a critical chunk and then its manifest are."""
    env.ingest("bulk")
    assert env.store.next_work(time.time(), NO_AGING, max_rank=0) is None
    alarm = env.ingest("critical")
    work = env.store.next_work(time.time(), NO_AGING, max_rank=0)
    assert isinstance(work, ChunkWork) and work.object_id == alarm.object_id
    env.store.mark_chunk_uploaded(work.chunk_id)
    work = env.store.next_work(time.time(), NO_AGING, max_rank=0)
    assert isinstance(work, ManifestWork) and work.object_id == alarm.object_id
    env.store.mark_committed(alarm.object_id)
    assert env.store.next_work(time.time(), NO_AGING, max_rank=0) is None
    bulk = env.store.next_work(time.time(), NO_AGING)  # the other streams still take bulk
    assert isinstance(bulk, ChunkWork) and bulk.priority == "bulk"
