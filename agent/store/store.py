"""The durable queue: a SQLite index plus one sealed file per chunk under state_dir.

Layout (state_dir):
    index.sqlite            objects, chunks, their states (WAL, synchronous=FULL)
    chunks/<id[:2]>/<id>    sealed chunks waiting for upload
    manifests/<object-id>   sealed, signed manifests waiting for upload
    staging/<object-id>/    an ingest in progress; promoted into chunks/ at commit
    lock                    held by the one process that writes the store

States: chunk sealed -> uploading -> uploaded (or corrupt); object queued -> committed
(or evicted, expired, damaged). All methods are blocking: call them through the executor.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent.config.settings import ClassSettings
from agent.errors import DiskFullError, QuotaExceededError, StoreError, StoreLockedError
from agent.store import seqbook
from agent.store.fsio import free_bytes, fsync_dir, is_disk_full

SCHEMA_VERSION = 2  # 2: manifest numbering (agent/store/seqbook.py); 1 is migrated
# Sealing adds a header and a tag to each chunk; manifests are small. Reserve with margin.
_PER_CHUNK_OVERHEAD = 128
# Ingest stops while fewer bytes than this would stay free on state_dir's filesystem: the
# index (its WAL grows to ~4 MiB between checkpoints) and the uplink's bookkeeping must still
# be written on a full disk, since recording uploads is what frees space again.
DISK_HEADROOM_BYTES = 4 << 20
# Checked again just before an object's commit: promotion only renames, but a rename can
# need a new directory block, and failing after the commit is the case to avoid.
_COMMIT_ROOM_BYTES = 256 << 10
# Blocks held back for the index (state_dir/index.sqlite-spare), for when another program
# has taken the headroom: given up to open the index on a full disk and when the uplink
# cannot record an upload (recording uploads is what frees space); taken again once there is
# room.
SPARE_BYTES = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    source_key TEXT,
    class TEXT NOT NULL,
    rank INTEGER NOT NULL,
    size INTEGER NOT NULL,
    manifest_bytes INTEGER NOT NULL,
    manifest_hash TEXT,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    chunks_left INTEGER NOT NULL,
    finished REAL,
    items INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS objects_queue ON objects(state, rank, created);
CREATE INDEX IF NOT EXISTS objects_source_key ON objects(source_key);
CREATE TABLE IF NOT EXISTS chunks (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    sealed_size INTEGER NOT NULL,
    plain_size INTEGER NOT NULL,
    sealed_hash TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    has_file INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_state ON chunks(state);
CREATE TABLE IF NOT EXISTS object_chunks (
    object_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    chunk_id TEXT NOT NULL,
    PRIMARY KEY (object_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS object_chunks_chunk ON object_chunks(chunk_id);
CREATE TABLE IF NOT EXISTS object_sources (
    source_key TEXT NOT NULL,
    object_id TEXT NOT NULL,
    PRIMARY KEY (source_key, object_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_deletes (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class StagedChunk:
    id: str
    sealed_size: int
    plain_size: int
    sealed_hash: str


@dataclass
class StagedObject:
    """An ingest in progress: new chunk files sit in its staging folder until commit."""

    object_id: str
    source: str
    source_key: str | None
    priority: str
    size: int
    chunk_ids: list[str] = field(default_factory=list)  # in order, with repeats
    new_chunks: dict[str, StagedChunk] = field(default_factory=dict)
    manifest_bytes: int = 0
    manifest_hash: str = ""  # BLAKE3 of the sealed manifest file
    member_keys: list[str] = field(default_factory=list)  # source keys of a pack's files
    created: float | None = None  # the manifest's `created` (its cloud date folder), if set


@dataclass(frozen=True)
class ChunkWork:
    chunk_id: str
    path: Path
    sealed_size: int
    sealed_hash: str
    object_id: str
    priority: str
    manifest_bytes: int = 0  # of its object: a window budget keeps room to commit it


@dataclass(frozen=True)
class ManifestWork:
    object_id: str
    path: Path
    created: float
    priority: str
    manifest_bytes: int = 0
    manifest_hash: str = ""


Work = ChunkWork | ManifestWork


@dataclass(frozen=True)
class Eviction:
    object_id: str
    priority: str
    size: int
    reason: str  # "quota" or "ttl"


@dataclass
class ClassSummary:
    items: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    oldest_queued_age_s: float | None = None


LOCK_POLL_S = 0.05  # how often a waiting process tries the store lock again
log = logging.getLogger("skyferry.store")


class Store:
    """The local durable queue. One writer process; thread-safe inside it."""

    def __init__(self, state_dir: Path, classes: Iterable[ClassSettings],
                 quota_bytes: int | None = None, *, read_only: bool = False,
                 lock_wait_s: float = 0.0) -> None:
        self.state_dir = state_dir
        self.classes = {c.name: c for c in classes}
        self.quota_bytes = quota_bytes
        self.read_only = read_only
        self._lock = threading.RLock()
        # Per-thread read-only connections (WAL lets them read while a commit is written):
        # the ingest threads' dedup lookups do not wait for another thread's commit.
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock_fd: int | None = None
        self._reserved = 0
        self._used = 0
        self._manifests_inflight: set[str] = set()
        self._unpromoted: set[str] = set()  # committed, files still in staging (disk full)
        self.chunks_dir = state_dir / "chunks"
        self._chunk_folders: set[str] = set()  # chunks/<xx> folders known to exist
        self.manifests_dir = state_dir / "manifests"
        self.staging_dir = state_dir / "staging"
        if read_only:
            index = state_dir / "index.sqlite"
            if not index.exists():
                raise StoreError(f"no skyferry store at {state_dir} (missing {index})")
            # as_uri() percent-encodes '#', '?' and '%' that would otherwise end the path
            self._db = sqlite3.connect(f"{index.absolute().as_uri()}?mode=ro", uri=True,
                                       check_same_thread=False, isolation_level=None)
            return
        for d in (state_dir, self.chunks_dir, self.manifests_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._take_lock(lock_wait_s)
        if free_bytes(state_dir) < SPARE_BYTES:
            self.give_up_spare()  # opening the index needs blocks (its -wal and -shm files)
        try:
            self._db = sqlite3.connect(state_dir / "index.sqlite", check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            if free_bytes(state_dir) >= _COMMIT_ROOM_BYTES:
                raise
            raise DiskFullError(self._disk_full_message(f"{e} opening the index")) from e
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA + seqbook.SCHEMA)
        self._add_missing_columns()
        self._check_schema_version()
        self._reconcile()

    # ---- opening and start-up -------------------------------------------------------------

    def _take_lock(self, wait_s: float) -> None:
        """Hold the store's lock; wait up to `wait_s` for another process to let it go (a
        `skyferry put` writing directly while the daemon starts holds it for a moment)."""
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if wait_s > 0 and not told:  # a start that seems to hang says why
                    told = True
                    log.info("the store %s is in use by another skyferry process (a `skyferry "
                             "put` writing directly?); waiting up to %gs for it",
                             self.state_dir, wait_s, extra={"event": "store_lock_wait"})
                if time.monotonic() >= deadline:
                    os.close(fd)
                    waited = f" after waiting {wait_s:g}s" if wait_s > 0 else ""
                    raise StoreLockedError(
                        f"the store {self.state_dir} is in use by another skyferry process "
                        f"(normally the running daemon){waited}; stop it or talk to it "
                        "through its socket") from None
                time.sleep(LOCK_POLL_S)
        self._lock_fd = fd

    def _add_missing_columns(self) -> None:
        """Columns added after schema 1 shipped; old rows keep NULL (checked by size only)."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(objects)")}
        if "manifest_hash" not in have:
            self._db.execute("ALTER TABLE objects ADD COLUMN manifest_hash TEXT")
        if "items" not in have:  # files in a pack; 1 for everything else
            self._db.execute("ALTER TABLE objects ADD COLUMN items INTEGER NOT NULL DEFAULT 1")
        seqbook.add_columns(self._db, have)

    def _check_schema_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None or int(row[0]) == 1:  # 1 -> 2 is `_add_missing_columns`, done
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)",
                             (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"store {self.state_dir} has schema {row[0]}, this skyferry uses {SCHEMA_VERSION}"
            )

    def _reconcile(self) -> None:
        """Make the index and the files agree after a crash; cost grows with in-flight work only."""
        with self._txn():
            self._db.execute("UPDATE chunks SET state='sealed' WHERE state='uploading'")
            # A seq allocated by an ingest that never committed (crash, kill) is void.
            seqbook.void_pending(self._db, None, "interrupted")
        for staged in list(self.staging_dir.iterdir()):
            if not staged.is_dir():
                staged.unlink()
                continue
            row = self._db.execute("SELECT 1 FROM objects WHERE id=?", (staged.name,)).fetchone()
            if row is None:
                shutil.rmtree(staged)  # never committed: the source still holds the data
            else:
                # Committed but not (durably) moved into place. A power cut can also have lost
                # moves whose files the uplink had since sent and let go: those stay gone.
                self._drop_released(staged)
                self._promote(staged)
        self._finish_pending_deletes()
        for tmp in self.manifests_dir.glob(".*.tmp"):
            tmp.unlink()
        self._used = self._compute_used()
        self._keep_spare()

    def _finish_pending_deletes(self) -> None:
        """Remove local copies a crash left behind after their release was committed."""
        rows = self._db.execute("SELECT kind, id FROM pending_deletes").fetchall()
        for kind, item in rows:
            if kind == "chunk":
                path = self.chunk_path(item)
                keep = self._db.execute(  # a later ingest may have brought the chunk back
                    "SELECT 1 FROM chunks WHERE id=? AND has_file=1", (item,)).fetchone()
            else:
                path = self.manifest_path(item)
                keep = self._db.execute(
                    "SELECT 1 FROM objects WHERE id=? AND state='queued'", (item,)).fetchone()
            if keep is None:
                path.unlink(missing_ok=True)
        if rows:
            with self._txn() as db:
                db.execute("DELETE FROM pending_deletes")

    def _compute_used(self) -> int:
        chunks = self._db.execute(
            "SELECT COALESCE(SUM(sealed_size), 0) FROM chunks WHERE has_file=1").fetchone()[0]
        manifests = self._db.execute(
            "SELECT COALESCE(SUM(manifest_bytes), 0) FROM objects WHERE state='queued'"
        ).fetchone()[0]
        return int(chunks) + int(manifests)

    def _reader(self) -> sqlite3.Connection:
        if self.read_only:
            return self._db
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            index = (self.state_dir / "index.sqlite").absolute()
            db = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True,
                                 check_same_thread=False, isolation_level=None)
            with self._lock:
                self._readers.append(db)
            self._local.db = db
        return db

    def close(self) -> None:
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")  # inside: a COMMIT that fails must roll back too
            except BaseException as e:
                # SQLite may already have rolled back by itself (SQLITE_FULL): a second
                # ROLLBACK would fail and hide the real error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if is_disk_full(e):
                    raise self.disk_full_error(e) from e
                raise

    @property
    def _spare(self) -> Path:
        return self.state_dir / "index.sqlite-spare"

    def _keep_spare(self) -> bool:
        """Hold SPARE_BYTES of real blocks (see SPARE_BYTES) if there is room for them besides
        the headroom; True when it was made now."""
        if (self._spare.exists()
                or free_bytes(self.state_dir) < DISK_HEADROOM_BYTES + SPARE_BYTES):
            return False
        try:
            fd = os.open(self._spare, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, SPARE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            self._spare.unlink(missing_ok=True)
            return False
        return True

    def give_up_spare(self) -> None:
        """The index cannot be written for lack of room: free the spare blocks (the uplink
        does, so recording uploads, which frees space, goes on)."""
        with contextlib.suppress(OSError):
            self._spare.unlink()

    # ---- paths ----------------------------------------------------------------------------

    def chunk_path(self, chunk_id: str) -> Path:
        return self.chunks_dir / chunk_id[:2] / chunk_id

    def manifest_path(self, object_id: str) -> Path:
        return self.manifests_dir / object_id

    def staging_path(self, object_id: str) -> Path:
        return self.staging_dir / object_id

    # ---- quota ----------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    def reserve(self, nbytes: int, priority: str, max_chunk: int) -> tuple[int, list[Eviction]]:
        """Reserve room for an object of `nbytes`; evict per class policy or refuse.

        Returns the reserved amount (release it with `release`) and what was evicted.
        """
        cls = self._class(priority)
        need = nbytes + (nbytes // max(1, max_chunk) + 2) * _PER_CHUNK_OVERHEAD + 4096
        with self._lock:
            evicted: list[Eviction] = []
            self._check_disk_room(need)  # first: never evict for a disk that refuses anyway
            if self.quota_bytes is not None:
                # Evict only if that makes room: evicting and then refusing anyway would drop
                # data for nothing (an object larger than the quota would empty whole classes).
                over = self._used + self._reserved + need - self.quota_bytes
                may_evict = over <= 0 or over <= self._freeable(cls)
                while self._used + self._reserved + need > self.quota_bytes:
                    victim = self._eviction_candidate(cls) if may_evict else None
                    if victim is None:
                        raise QuotaExceededError(
                            f"state_dir quota of {self.quota_bytes} bytes is full "
                            f"({self._used} used, {self._reserved} reserved, {need} needed) and "
                            f"class {priority!r} (policy {cls.policy}) may not evict enough to "
                            "make room; data stays at its source until the queue drains"
                        )
                    evicted.append(self._evict(victim, "quota"))
            self._reserved += need
            return need, evicted

    def _check_disk_room(self, need: int) -> None:
        """Refuse while the filesystem, not the quota, is what is full (a quota set above the
        disk's size, or other data on the same disk)."""
        free = free_bytes(self.state_dir)
        if self._keep_spare():  # given up on a full disk: there is room again
            free = free_bytes(self.state_dir)
        # Reservations in progress may not be written yet: count them as if they were not.
        if free - self._reserved - need < DISK_HEADROOM_BYTES:
            raise DiskFullError(self._disk_full_message(
                f"{free} bytes free, {self._reserved} reserved by ingests in progress, "
                f"{need} needed and {DISK_HEADROOM_BYTES} kept free for the index"))

    def _disk_full_message(self, what: str) -> str:
        return (f"the disk holding state_dir {self.state_dir} is full ({what}); the data "
                "stays at its source and ingest resumes by itself as uploads free space; to "
                "resume sooner, free space on that filesystem or grow it, and keep store.quota "
                "below its size")

    def disk_full_error(self, e: BaseException) -> DiskFullError:
        """The error to raise for an ENOSPC or SQLITE_FULL met while writing the store."""
        if isinstance(e, OSError):
            what = f"{e.strerror or e} writing {e.filename or self.state_dir}"
        else:
            what = f"{e} writing {self.state_dir / 'index.sqlite'}"
        return DiskFullError(self._disk_full_message(what))

    def release(self, reserved: int) -> None:
        with self._lock:
            self._reserved -= reserved

    def _class(self, name: str) -> ClassSettings:
        try:
            return self.classes[name]
        except KeyError:
            raise StoreError(
                f"unknown priority class {name!r}; configured: {', '.join(self.classes)}"
            ) from None

    def _evictable(self, incoming: ClassSettings) -> list[ClassSettings]:
        """Classes whose queued objects may make room for `incoming`, lowest class first."""
        same_ok = incoming.policy == "evict-oldest"
        evictable = [c for c in self.classes.values() if c.policy == "evict-oldest" and (
            c.rank > incoming.rank or (c.rank == incoming.rank and same_ok))]
        return sorted(evictable, key=lambda c: -c.rank)

    def _freeable(self, incoming: ClassSettings) -> int:
        """Bytes that evicting every object `incoming` may evict would free (quota full only)."""
        names = [c.name for c in self._evictable(incoming)]
        if not names:
            return 0
        marks = ",".join("?" * len(names))
        needed_by = ("SELECT oc.chunk_id FROM object_chunks oc JOIN objects o ON "
                     f"o.id=oc.object_id WHERE o.state='queued' AND o.class {{}} IN ({marks})")
        manifests = self._db.execute(
            "SELECT COALESCE(SUM(manifest_bytes), 0) FROM objects WHERE state='queued' AND "
            f"class IN ({marks})", names).fetchone()[0]
        # As in _drop_unneeded_chunks: a chunk another queued object still needs stays.
        chunks = self._db.execute(
            "SELECT COALESCE(SUM(sealed_size), 0) FROM chunks WHERE has_file=1 AND "
            f"id IN ({needed_by.format('')}) AND id NOT IN ({needed_by.format('NOT')})",
            names + names).fetchone()[0]
        return int(manifests) + int(chunks)

    def _eviction_candidate(self, incoming: ClassSettings) -> tuple[str, str] | None:
        for c in self._evictable(incoming):
            row = self._db.execute(
                "SELECT id FROM objects WHERE state='queued' AND class=? ORDER BY created LIMIT 1",
                (c.name,),
            ).fetchone()
            if row is not None:
                return row[0], c.name
        return None

    def _evict(self, victim: tuple[str, str], reason: str) -> Eviction:
        object_id, cls = victim
        with self._txn() as db:
            size = db.execute("SELECT size FROM objects WHERE id=?", (object_id,)).fetchone()[0]
            db.execute("UPDATE objects SET state=?, finished=? WHERE id=?",
                       ("evicted" if reason == "quota" else "expired", time.time(), object_id))
            freed_files = self._drop_unneeded_chunks(db, object_id, drop_unsent=True)
        self._remove_object_files(object_id, freed_files)
        return Eviction(object_id, cls, int(size), reason)

    def expire(self, now: float) -> list[Eviction]:
        """Drop queued objects older than their class TTL."""
        out: list[Eviction] = []
        for c in self.classes.values():
            if c.ttl_s is None:
                continue
            with self._lock:
                rows = self._db.execute(
                    "SELECT id FROM objects WHERE state='queued' AND class=? AND created<?",
                    (c.name, now - c.ttl_s),
                ).fetchall()
                out.extend(self._evict((r[0], c.name), "ttl") for r in rows)
        return out

    # ---- ingest ---------------------------------------------------------------------------

    def chunk_known(self, chunk_id: str) -> bool:
        """True when this chunk is already queued or already in the cloud (dedup).

        Read without the store's lock: a chunk committed by another thread a moment ago may
        be missed, and is then sealed twice and dropped at commit (`_insert_object`)."""
        row = self._reader().execute(
            "SELECT state FROM chunks WHERE id=?", (chunk_id,)).fetchone()
        return row is not None and row[0] != "corrupt"

    def accepted_source_key(self, source_key: str) -> str | None:
        """Object id already accepted for this source item (so a re-scan does not duplicate)."""
        db = self._reader()
        row = db.execute(
            "SELECT id FROM objects WHERE source_key=? AND state IN ('queued','committed')",
            (source_key,),
        ).fetchone() or db.execute(
            "SELECT o.id FROM object_sources s JOIN objects o ON o.id=s.object_id "
            "WHERE s.source_key=? AND o.state IN ('queued','committed') LIMIT 1",
            (source_key,),
        ).fetchone()
        return None if row is None else str(row[0])

    def accepted_source_keys(self, source_keys: list[str]) -> dict[str, str]:
        """`accepted_source_key` for many keys at once: {key: object id} of those accepted."""
        db = self._reader()
        found: dict[str, str] = {}
        for at in range(0, len(source_keys), 500):
            part = source_keys[at:at + 500]
            marks = ",".join("?" * len(part))
            found.update(db.execute(
                f"SELECT source_key, id FROM objects WHERE source_key IN ({marks}) "
                "AND state IN ('queued','committed')", part).fetchall())
            found.update(db.execute(
                f"SELECT s.source_key, o.id FROM object_sources s JOIN objects o "
                f"ON o.id=s.object_id WHERE s.source_key IN ({marks}) "
                "AND o.state IN ('queued','committed')", part).fetchall())
        return found

    def commit_object(self, staged: StagedObject) -> None:
        """Make a staged object part of the queue: the moment its data counts as accepted.

        The caller has made the staged files and the staging folder's entries durable
        (`fsio.StagingFolder.sync`).
        """
        cls = self._class(staged.priority)
        stage = self.staging_path(staged.object_id)
        # The lock spans commit and the moves into place, so the uplink never sees a row
        # without its file. The moves are not fsynced (that was one folder fsync per chunk
        # folder touched, ~100 per pack): the files' data and their staging entries are
        # durable before the commit, a journaling filesystem keeps the renames in order, and
        # a power cut that loses some leaves those files in staging, where start-up
        # (`_reconcile`) promotes them again before anything reads them.
        with self._lock:
            self._room_to_promote(staged)
            added = self._insert_object(staged, cls, stage)
            self._used += staged.manifest_bytes + added
            try:
                touched = self._move_into_place(stage)
            except OSError as e:
                if not is_disk_full(e):
                    raise
                # Accepted all the same: the index holds it and its files are durable in
                # staging. next_work moves them into place once there is room and hands
                # none of them to the uplink before.
                self._unpromoted.add(staged.object_id)
                return
        del touched

    def _room_to_promote(self, staged: StagedObject) -> None:
        """Before the commit: make the chunk folders promotion needs and check the disk still
        has room for their entries, so a full disk refuses here rather than after it."""
        try:
            made = False
            for cid in staged.new_chunks:
                if cid[:2] in self._chunk_folders:  # chunk folders are never removed
                    continue
                folder = self.chunk_path(cid).parent
                if not folder.is_dir():
                    folder.mkdir(exist_ok=True)
                    made = True
                self._chunk_folders.add(cid[:2])
            if made:
                fsync_dir(self.chunks_dir)  # the new sub-folder's own entry must persist
        except OSError as e:
            if is_disk_full(e):
                raise self.disk_full_error(e) from e
            raise
        free = free_bytes(self.state_dir)
        if free < _COMMIT_ROOM_BYTES:
            raise DiskFullError(self._disk_full_message(f"{free} bytes free at commit"))

    def _retry_promotions(self) -> None:
        """Move into place what a full disk kept in staging after its commit."""
        for object_id in list(self._unpromoted):
            stage = self.staging_path(object_id)
            try:
                if stage.is_dir():
                    self._promote(stage)
            except OSError:
                continue  # still no room: tried again at the next claim
            self._unpromoted.discard(object_id)

    def _insert_object(self, staged: StagedObject, cls: ClassSettings, stage: Path) -> int:
        """Insert rows; returns the sealed bytes of chunks this object really added."""
        added = 0
        with self._txn() as db:
            for cid, ch in staged.new_chunks.items():
                row = db.execute("SELECT state, has_file FROM chunks WHERE id=?",
                                 (cid,)).fetchone()
                if row is not None and row[0] != "corrupt" and (row[1] or row[0] == "uploaded"):
                    # Another ingest committed the same content meanwhile: keep its copy
                    # (it may be uploading) and drop ours before this commit can reference it.
                    (stage / cid).unlink(missing_ok=True)
                    continue
                added += ch.sealed_size
                db.execute(
                    "INSERT INTO chunks (id, state, sealed_size, plain_size, sealed_hash, "
                    "has_file) VALUES (?, 'sealed', ?, ?, ?, 1) ON CONFLICT(id) DO UPDATE SET "
                    "state=CASE WHEN chunks.state='corrupt' THEN 'sealed' ELSE chunks.state END, "
                    "sealed_size=excluded.sealed_size, sealed_hash=excluded.sealed_hash, "
                    "has_file=1",
                    (cid, ch.sealed_size, ch.plain_size, ch.sealed_hash),
                )
            distinct = set(staged.chunk_ids)
            missing = [c for c in distinct if c not in staged.new_chunks and db.execute(
                "SELECT 1 FROM chunks WHERE id=? AND state!='corrupt'", (c,)).fetchone() is None]
            if missing:
                raise StoreError(
                    f"chunk {missing[0]} vanished from the store during ingest (evicted); "
                    "the object stays at its source and will be ingested again"
                )
            left = sum(
                1 for c in distinct
                if db.execute("SELECT state FROM chunks WHERE id=?", (c,)).fetchone()[0]
                != "uploaded"
            )
            num = seqbook.committed(db, staged.object_id)
            db.execute(
                "INSERT INTO objects (id, source, source_key, class, rank, size, manifest_hash,"
                " manifest_bytes, created, state, chunks_left, items, stream, seq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (staged.object_id, staged.source, staged.source_key, cls.name, cls.rank,
                 staged.size, staged.manifest_hash, staged.manifest_bytes,
                 staged.created or time.time(), left, max(1, len(staged.member_keys)),
                 num and num.stream, num and num.seq),
            )
            db.executemany(
                "INSERT INTO object_chunks (object_id, seq, chunk_id) VALUES (?, ?, ?)",
                [(staged.object_id, i, c) for i, c in enumerate(staged.chunk_ids)],
            )
            db.executemany(
                "INSERT OR IGNORE INTO object_sources (source_key, object_id) VALUES (?, ?)",
                [(k, staged.object_id) for k in staged.member_keys],
            )
        return added

    def _promote(self, stage: Path) -> None:
        """Move a committed object's staged files into place (idempotent: safe to redo)."""
        self._sync_moves(self._move_into_place(stage))

    def _sync_moves(self, touched: set[Path]) -> None:
        """Make moves into place durable (until then a crash leaves them in staging, and
        start-up promotes them again)."""
        for d in touched:
            fsync_dir(d)

    def _drop_released(self, stage: Path) -> None:
        """Remove staged files the index no longer keeps locally (sent, or the object done)."""
        for f in stage.iterdir():
            if f.name == "manifest":
                row = self._db.execute("SELECT state FROM objects WHERE id=?",
                                       (stage.name,)).fetchone()
                gone = row is None or row[0] != "queued"
            elif f.name.startswith("."):
                continue
            else:
                row = self._db.execute("SELECT has_file FROM chunks WHERE id=?",
                                       (f.name,)).fetchone()
                gone = row is None or not row[0]
            if gone:
                f.unlink()

    def _move_into_place(self, stage: Path) -> set[Path]:
        """The renames of `_promote`; returns the folders whose entries changed."""
        touched: set[Path] = set()
        for f in stage.iterdir():
            if f.name == "manifest":
                dest = self.manifest_path(stage.name)
            elif f.name.startswith("."):
                f.unlink()
                continue
            else:
                dest = self.chunk_path(f.name)
                if not dest.parent.is_dir():
                    dest.parent.mkdir(exist_ok=True)
                    touched.add(self.chunks_dir)  # the new sub-folder's own entry must persist
            os.replace(f, dest)
            touched.add(dest.parent)
        stage.rmdir()
        touched.add(self.staging_dir)
        return touched

    def abandon(self, object_id: str) -> None:
        """Throw away a staged ingest that will not be committed."""
        with self._lock:
            committed = self._db.execute(
                "SELECT 1 FROM objects WHERE id=?", (object_id,)).fetchone() is not None
        if committed:
            # The index already accepted it (promotion failed after the commit): its staged
            # files are the only copy, and the next start-up promotes them.
            return
        shutil.rmtree(self.staging_path(object_id), ignore_errors=True)
        with contextlib.suppress(DiskFullError), self._txn() as db:  # else: at next start-up
            seqbook.void_pending(db, object_id, "abandoned")

    # ---- manifest numbering (agent/store/seqbook.py) ---------------------------------------------

    def allocate_seq(self, object_id: str, key_id: str) -> seqbook.Numbered:
        """Durably number the manifest of `object_id` (signed by the key `key_id`)."""
        with self._txn() as db:
            return seqbook.allocate(db, key_id, object_id)

    def history_state(self, key_id: str) -> seqbook.HistoryState | None:
        with self._lock:
            return seqbook.state(self._db, key_id)

    def tip_sent(self, stream: str, n: int) -> None:
        with self._txn() as db:
            seqbook.tip_sent(db, stream, n)

    # ---- uplink ---------------------------------------------------------------------------

    def next_work(self, now: float, aging_s: float, max_chunk_bytes: int | None = None,
                  max_manifest_bytes: int | None = None) -> Work | None:
        """Claim the most urgent unit of work: a ready manifest first, then a chunk.

        With limits (what is left of a window's byte budget), only work that fits is claimed:
        a chunk counts with its object's manifest, so finishing an object leaves room to
        commit it.
        """
        with self._lock:
            if self._unpromoted:
                self._retry_promotions()
            return (self._next_manifest(max_manifest_bytes)
                    or self._next_chunk(now, aging_s, max_chunk_bytes))

    def _next_manifest(self, max_bytes: int | None = None) -> ManifestWork | None:
        inflight = tuple(self._manifests_inflight | self._unpromoted)
        marks = ",".join("?" * len(inflight))
        exclude = f"AND id NOT IN ({marks})" if inflight else ""
        fits = "" if max_bytes is None else f"AND manifest_bytes <= {int(max_bytes)}"
        row = self._db.execute(
            f"SELECT id, created, class, manifest_bytes, manifest_hash FROM objects "
            f"WHERE state='queued' "
            f"AND chunks_left=0 {exclude} {fits} ORDER BY rank, created LIMIT 1",
            inflight,
        ).fetchone()
        if row is None:
            return None
        self._manifests_inflight.add(row[0])
        return ManifestWork(row[0], self.manifest_path(row[0]), row[1], row[2], int(row[3]),
                            row[4] or "")

    def _next_chunk(self, now: float, aging_s: float,
                    max_bytes: int | None = None) -> ChunkWork | None:
        best: tuple[float, float, ChunkWork] | None = None
        ranks = [r[0] for r in self._db.execute(
            "SELECT DISTINCT rank FROM objects WHERE state='queued' AND chunks_left>0")]
        for rank in ranks:
            # Objects whose remaining chunks are all in flight are skipped; there are at
            # most as many of those as there are streams, so this scan stays short.
            for oid, created, cls, mbytes in self._db.execute(
                "SELECT id, created, class, manifest_bytes FROM objects WHERE state='queued' "
                "AND rank=? AND chunks_left>0 ORDER BY created LIMIT 256", (rank,),
            ).fetchall():
                room = 1 << 62 if max_bytes is None else max_bytes - int(mbytes)
                row = self._db.execute(
                    "SELECT c.id, c.sealed_size, c.sealed_hash FROM object_chunks oc "
                    "JOIN chunks c ON c.id=oc.chunk_id WHERE oc.object_id=? AND "
                    "c.state='sealed' AND c.sealed_size<=? ORDER BY oc.seq LIMIT 1", (oid, room),
                ).fetchone()
                if row is None or (self._unpromoted and not self.chunk_path(row[0]).exists()):
                    continue  # its file waits in a staging folder for room (disk full)
                effective = rank - max(0.0, now - created) / aging_s
                work = ChunkWork(row[0], self.chunk_path(row[0]), row[1], row[2], oid, cls,
                                 int(mbytes))
                if best is None or (effective, created) < (best[0], best[1]):
                    best = (effective, created, work)
                break
        if best is None:
            return None
        with self._txn() as db:
            db.execute("UPDATE chunks SET state='uploading', attempts=attempts+1 WHERE id=?",
                       (best[2].chunk_id,))
        return best[2]

    def release_chunk(self, chunk_id: str) -> None:
        """An upload did not finish (cut, cancelled, failed): the chunk goes back in line."""
        with self._txn() as db:
            db.execute("UPDATE chunks SET state='sealed' WHERE id=? AND state='uploading'",
                       (chunk_id,))

    def release_manifest(self, object_id: str) -> None:
        with self._lock:
            self._manifests_inflight.discard(object_id)

    def mark_chunk_uploaded(self, chunk_id: str) -> None:
        with self._txn() as db:
            cur = db.execute(
                "UPDATE chunks SET state='uploaded' WHERE id=? AND state!='uploaded'", (chunk_id,))
            if cur.rowcount:
                db.execute(
                    "UPDATE objects SET chunks_left=chunks_left-1 WHERE state='queued' AND id IN "
                    "(SELECT DISTINCT object_id FROM object_chunks WHERE chunk_id=?)", (chunk_id,))

    def mark_chunk_corrupt(self, chunk_id: str) -> list[str]:
        """A chunk file is damaged: the objects that need it become `damaged` and, since they
        can never complete, their local files are released like an eviction's."""
        freed: dict[str, list[str]] = {}
        with self._txn() as db:
            db.execute("UPDATE chunks SET state='corrupt' WHERE id=?", (chunk_id,))
            objs = [r[0] for r in db.execute(
                "SELECT DISTINCT o.id FROM object_chunks oc JOIN objects o ON o.id=oc.object_id "
                "WHERE oc.chunk_id=? AND o.state='queued'", (chunk_id,))]
            db.executemany("UPDATE objects SET state='damaged', finished=? WHERE id=?",
                           [(time.time(), o) for o in objs])
            for o in objs:
                freed[o] = self._drop_unneeded_chunks(db, o, drop_unsent=True)
        for o, chunk_ids in freed.items():
            self._remove_object_files(o, chunk_ids)
        return objs

    def mark_manifest_corrupt(self, object_id: str) -> None:
        """The local manifest file is damaged: the object can never be committed."""
        freed: list[str] = []
        with self._txn() as db:
            cur = db.execute("UPDATE objects SET state='damaged', finished=? WHERE id=? AND "
                             "state='queued'", (time.time(), object_id))
            if cur.rowcount:  # else evicted meanwhile: its bytes were already given back
                freed = self._drop_unneeded_chunks(db, object_id, drop_unsent=True)
            self._manifests_inflight.discard(object_id)
        self._remove_object_files(object_id, freed)

    def mark_committed(self, object_id: str) -> None:
        """The cloud acknowledged the manifest: only now may the local copies go."""
        with self._txn() as db:
            row = db.execute("SELECT state FROM objects WHERE id=?", (object_id,)).fetchone()
            db.execute("UPDATE objects SET state='committed', finished=? WHERE id=?",
                       (time.time(), object_id))
            # Evicted while its manifest was in flight: its bytes were already given back.
            freed = (self._drop_unneeded_chunks(db, object_id, drop_unsent=False)
                     if row is not None and row[0] == "queued" else [])
            self._manifests_inflight.discard(object_id)
        self._remove_object_files(object_id, freed)

    def _drop_unneeded_chunks(self, db: sqlite3.Connection, object_id: str, *,
                              drop_unsent: bool) -> list[str]:
        """Chunks of `object_id` no queued object still needs; returns ids whose file can go."""
        freed: list[str] = []
        rows = db.execute(
            "SELECT DISTINCT c.id, c.state, c.sealed_size, c.has_file FROM object_chunks oc "
            "JOIN chunks c ON c.id=oc.chunk_id WHERE oc.object_id=?", (object_id,)).fetchall()
        for cid, state, size, has_file in rows:
            still_needed = db.execute(
                "SELECT 1 FROM object_chunks oc JOIN objects o ON o.id=oc.object_id "
                "WHERE oc.chunk_id=? AND o.state='queued' LIMIT 1", (cid,)).fetchone()
            if still_needed or not has_file:
                continue
            if state == "uploaded":
                db.execute("UPDATE chunks SET has_file=0 WHERE id=?", (cid,))
            elif drop_unsent:
                db.execute("DELETE FROM chunks WHERE id=?", (cid,))
            else:
                continue
            self._used -= size
            freed.append(cid)
        row = db.execute("SELECT manifest_bytes FROM objects WHERE id=?", (object_id,)).fetchone()
        self._used -= int(row[0])
        # Recorded in the same transaction, so a crash before the unlinks cannot strand them.
        db.executemany("INSERT OR IGNORE INTO pending_deletes (kind, id) VALUES (?, ?)",
                       [("manifest", object_id), *(("chunk", c) for c in freed)])
        return freed

    def _remove_object_files(self, object_id: str, chunk_ids: list[str]) -> None:
        self.manifest_path(object_id).unlink(missing_ok=True)
        for cid in chunk_ids:
            self.chunk_path(cid).unlink(missing_ok=True)
        with self._txn() as db:
            db.execute("DELETE FROM pending_deletes WHERE kind='manifest' AND id=?", (object_id,))
            db.executemany("DELETE FROM pending_deletes WHERE kind='chunk' AND id=?",
                           [(c,) for c in chunk_ids])

    def set_priority(self, object_id: str, priority: str) -> bool:
        """Move a queued object to another class (operator command); False if not queued."""
        cls = self._class(priority)
        with self._txn() as db:
            cur = db.execute("UPDATE objects SET class=?, rank=? WHERE id=? AND state='queued'",
                             (cls.name, cls.rank, object_id))
        return cur.rowcount > 0

    # ---- small persistent settings -------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        with self._txn() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # ---- reporting ------------------------------------------------------------------------

    def summary(self, now: float) -> dict[str, ClassSummary]:
        """Items (files, each file of a pack, MQTT batches) and bytes per class and state, and
        the age of the oldest queued object."""
        out: dict[str, ClassSummary] = {name: ClassSummary() for name in self.classes}
        with self._lock:
            rows = self._db.execute(
                "SELECT class, state, SUM(items), COALESCE(SUM(size), 0) FROM objects "
                "GROUP BY class, state").fetchall()
            oldest = self._db.execute(
                "SELECT class, MIN(created) FROM objects WHERE state='queued' GROUP BY class"
            ).fetchall()
        for cls, state, n, size in rows:
            s = out.setdefault(cls, ClassSummary())
            s.items[state] = int(n)
            s.bytes[state] = int(size)
        for cls, created in oldest:
            out.setdefault(cls, ClassSummary()).oldest_queued_age_s = max(0.0, now - created)
        return out

    def chunk_counts(self) -> dict[str, tuple[int, int]]:
        """Chunk count and sealed bytes per chunk state."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*), COALESCE(SUM(sealed_size), 0) FROM chunks "
                "GROUP BY state").fetchall()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def savings(self) -> tuple[int, int]:
        """(compression, dedup) bytes saved over everything this store accepted."""
        with self._lock:
            plain, sealed = self._db.execute(
                "SELECT COALESCE(SUM(plain_size), 0), COALESCE(SUM(sealed_size), 0) FROM chunks "
                "WHERE state!='corrupt'").fetchone()
            objects = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM objects WHERE state IN ('queued','committed')"
            ).fetchone()[0]
        return int(plain) - int(sealed), max(0, int(objects) - int(plain))

    def pending_objects(self) -> int:
        with self._lock:
            return int(self._db.execute(
                "SELECT COUNT(*) FROM objects WHERE state='queued'").fetchone()[0])
