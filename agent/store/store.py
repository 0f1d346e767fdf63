"""The durable queue: a SQLite index plus one sealed file per chunk under state_dir.

Layout (state_dir):
    index.sqlite            objects, chunks, their states (WAL, synchronous=FULL)
    chunks/<id[:2]>/<id>    sealed chunks waiting for upload
    manifests/<object-id>   sealed, signed manifests waiting for upload
    staging/<object-id>/    an ingest in progress; promoted into chunks/ at commit
    lock                    held by the one process that writes the store

States: chunk sealed -> uploading -> uploaded (or corrupt); object queued -> committed
(or evicted, expired, damaged). All methods are blocking: call them through the executor.

`Store` composes the parts over one connection (`index.Index`): `schema` (tables, migration),
`recovery` (start-up), `quota` (reservations, eviction, expiry), `staging` (dedup, commit,
promotion), `queue` (claims and acknowledgements), `release` (letting local copies go) and
`reports`. The steps that move or remove files stay methods here, so that what a crash or a
full disk interrupts is one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from agent.config.settings import ClassSettings
from agent.errors import DiskFullError
from agent.store import horizon, recovery, release, room, schema, seqbook, staging
from agent.store.fsio import is_disk_full
from agent.store.index import Index
from agent.store.queue import Queue
from agent.store.quota import Quota
from agent.store.records import (
    ChunkWork,
    ClassSummary,
    Eviction,
    ManifestWork,
    StagedChunk,
    StagedObject,
    Work,
)
from agent.store.reports import Reports
from agent.store.staging import Staging

# The values that make up the store's interface, importable with it.
__all__ = ["ChunkWork", "ClassSummary", "Eviction", "ManifestWork", "StagedChunk",
           "StagedObject", "Store", "Work"]


class Store:
    """The local durable queue. One writer process; thread-safe inside it."""

    def __init__(self, state_dir: Path, classes: Iterable[ClassSettings],
                 quota_bytes: int | None = None, *, read_only: bool = False,
                 lock_wait_s: float = 0.0) -> None:
        self.state_dir = state_dir
        self.classes = {c.name: c for c in classes}
        self.quota_bytes = quota_bytes
        self.read_only = read_only
        self._index = Index(state_dir, read_only=read_only, lock_wait_s=lock_wait_s)
        self.chunks_dir = self._index.chunks_dir
        self.manifests_dir = self._index.manifests_dir
        self.staging_dir = self._index.staging_dir
        self._quota = Quota(self._index, self.classes, quota_bytes, self._remove_object_files)
        self._staging = Staging(self._index)
        self._queue = Queue(self._index)
        self._reports = Reports(self._index, list(self.classes))
        self.horizon = horizon.Promise(None, False)  # `apply_dedup_horizon` sets it
        if not read_only:
            try:
                schema.migrate(self._index.db, state_dir)
                recovery.reconcile(self._index, self._promote)
            except BaseException:
                self._index.close()  # the lock and the connection go with the failed open
                raise

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def give_up_spare(self) -> None:
        """The index cannot be written for lack of room: free the spare blocks (the uplink
        does, so recording uploads, which frees space, goes on)."""
        room.give_up_spare(self.state_dir)

    def disk_full_error(self, e: BaseException) -> DiskFullError:
        """The error to raise for an ENOSPC or SQLITE_FULL met while writing the store."""
        return room.disk_full_error(self.state_dir, e)

    # ---- paths ----------------------------------------------------------------------------

    def chunk_path(self, chunk_id: str) -> Path:
        return self._index.chunk_path(chunk_id)

    def manifest_path(self, object_id: str) -> Path:
        return self._index.manifest_path(object_id)

    def staging_path(self, object_id: str) -> Path:
        return self._index.staging_path(object_id)

    # ---- quota (agent/store/quota.py) -----------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._index.used

    def reserve(self, nbytes: int, priority: str, max_chunk: int) -> tuple[int, list[Eviction]]:
        """Reserve room for an object of `nbytes`; evict per class policy or refuse.

        Returns the reserved amount (release it with `release`) and what was evicted.
        """
        return self._quota.reserve(nbytes, priority, max_chunk)

    def release(self, reserved: int) -> None:
        self._quota.release(reserved)

    def expire(self, now: float) -> list[Eviction]:
        """Drop queued objects older than their class TTL."""
        return self._quota.expire(now)

    # ---- ingest (agent/store/staging.py) --------------------------------------------------

    def chunk_known(self, chunk_id: str, with_file: bool = False) -> bool:
        """True when this chunk is already queued or already in the cloud (dedup); with
        `with_file`, only when its local copy is kept (a dedup horizon)."""
        return self._staging.chunk_known(chunk_id, with_file)

    def accepted_source_key(self, source_key: str) -> str | None:
        """Object id already accepted for this source item (so a re-scan does not duplicate)."""
        return self._staging.accepted_source_key(source_key)

    def accepted_source_keys(self, source_keys: list[str]) -> dict[str, str]:
        """`accepted_source_key` for many keys at once: {key: object id} of those accepted."""
        return self._staging.accepted_source_keys(source_keys)

    def commit_object(self, staged: StagedObject) -> None:
        """Make a staged object part of the queue: the moment its data counts as accepted.

        The caller has made the staged files and the staging folder's entries durable
        (`fsio.StagingFolder.sync`).
        """
        cls = self._quota.class_(staged.priority)
        stage = self.staging_path(staged.object_id)
        # The lock spans commit and the moves into place, so the uplink never sees a row
        # without its file. The moves are not fsynced (that would be one folder fsync per
        # chunk folder touched, ~100 per pack): the files' data and their staging entries are
        # durable before the commit, a journaling filesystem keeps the renames in order, and
        # a power cut that loses some leaves those files in staging, where start-up
        # (`recovery.reconcile`) promotes them again before anything reads them.
        with self._index.lock:
            self._staging.room_to_promote(staged)
            added = self._staging.insert_object(staged, cls, stage)
            self._index.used += staged.manifest_bytes + added
            try:
                self._move_into_place(stage)
            except OSError as e:
                if not is_disk_full(e):
                    raise
                # Accepted all the same: the index holds it and its files are durable in
                # staging. next_work moves them into place once there is room and hands
                # none of them to the uplink before.
                self._index.unpromoted.add(staged.object_id)

    def abandon(self, object_id: str) -> None:
        """Throw away a staged ingest that will not be committed."""
        self._staging.abandon(object_id)

    def _move_into_place(self, stage: Path) -> set[Path]:
        """The renames of `_promote`; returns the folders whose entries changed."""
        return staging.move_into_place(self._index, stage)

    def _promote(self, stage: Path) -> None:
        """Move a committed object's staged files into place (idempotent: safe to redo)."""
        staging.sync_moves(self._move_into_place(stage))

    def _retry_promotions(self) -> None:
        """Move into place what a full disk kept in staging after its commit."""
        for object_id in list(self._index.unpromoted):
            stage = self.staging_path(object_id)
            try:
                if stage.is_dir():
                    self._promote(stage)
            except OSError:
                continue  # still no room: tried again at the next claim
            self._index.unpromoted.discard(object_id)

    # ---- manifest numbering (agent/store/seqbook.py) --------------------------------------

    def allocate_seq(self, object_id: str, key_id: str) -> seqbook.Numbered:
        """Durably number the manifest of `object_id` (signed by the key `key_id`)."""
        with self._index.txn() as db:
            return seqbook.allocate(db, key_id, object_id)

    def history_state(self, key_id: str) -> seqbook.HistoryState | None:
        """Read on this thread's own connection, not under the store's lock: its ranges walk
        every queued seq of the stream, which claims must not wait behind."""
        db = self._index.reader()
        db.execute("BEGIN")  # one snapshot for the stream's row and both range queries
        try:
            return seqbook.state(db, key_id)
        finally:
            db.execute("COMMIT")

    def tip_sent(self, stream: str, n: int) -> None:
        with self._index.txn() as db:
            seqbook.tip_sent(db, stream, n)

    # ---- dedup horizon (agent/store/horizon.py; docs/FORMAT.md "Retention") ----------------

    def apply_dedup_horizon(self, configured_s: float | None, now: float) -> horizon.Promise:
        """Record the configured horizon; once declared in manifests it is never loosened."""
        with self._index.txn() as db:
            self.horizon = horizon.apply(db, configured_s, now)
        return self.horizon

    def horizon_to_declare(self) -> int:
        """The horizon a manifest signed now declares (seconds; 0: none yet)."""
        h = self.horizon
        if h.horizon_s is not None and not h.active:
            with self._index.txn() as db:
                if horizon.activate_if_ready(db):
                    self.horizon = h = horizon.Promise(h.horizon_s, True)
        return int(h.horizon_s) if h.active and h.horizon_s is not None else 0

    def chunk_confirmed(self, chunk_id: str, at: float) -> None:
        with self._index.txn() as db:
            horizon.confirm(db, chunk_id, at)

    def stale_chunks(self, object_id: str, now: float,
                     horizon_s: float) -> list[horizon.StaleChunk]:
        with self._index.txn() as db:
            return horizon.stale_chunks(db, object_id, now, horizon_s)

    # ---- uplink (agent/store/queue.py) ----------------------------------------------------

    def next_work(self, now: float, aging_s: float, max_chunk_bytes: int | None = None,
                  max_manifest_bytes: int | None = None, *,
                  max_rank: int | None = None) -> Work | None:
        """Claim the most urgent unit of work: a ready manifest first, then a chunk.

        With limits (what is left of a window's byte budget), only work that fits is claimed:
        a chunk counts with its object's manifest, so finishing an object leaves room to
        commit it. `max_rank`: only work of classes ranked this or better (the uplink's
        stream kept for urgent data).
        """
        with self._index.lock:
            if self._index.unpromoted:
                self._retry_promotions()
            return self._queue.next_work(now, aging_s, max_chunk_bytes, max_manifest_bytes,
                                         max_rank=max_rank)

    def release_chunk(self, chunk_id: str) -> None:
        """An upload did not finish (cut, cancelled, failed): the chunk goes back in line."""
        self._queue.release_chunk(chunk_id)

    def release_manifest(self, object_id: str) -> None:
        self._queue.release_manifest(object_id)

    def mark_chunk_uploaded(self, chunk_id: str) -> None:
        self._queue.mark_chunk_uploaded(chunk_id)

    def mark_chunk_corrupt(self, chunk_id: str) -> list[str]:
        """A chunk file is damaged: the objects that need it become `damaged` and, since they
        can never complete, their local files are released like an eviction's."""
        freed = self._queue.mark_chunk_corrupt(chunk_id)
        for o, chunk_ids in freed.items():
            self._remove_object_files(o, chunk_ids)
        return list(freed)

    def mark_manifest_corrupt(self, object_id: str) -> None:
        """The local manifest file is damaged: the object can never be committed."""
        self._remove_object_files(object_id, self._queue.mark_manifest_corrupt(object_id))

    def mark_committed(self, object_id: str) -> None:
        """The cloud acknowledged the manifest: only now may the local copies go."""
        self._remove_object_files(object_id, self._queue.mark_committed(object_id))

    def _remove_object_files(self, object_id: str, chunk_ids: list[str]) -> None:
        release.remove_object_files(self._index, object_id, chunk_ids)

    def set_priority(self, object_id: str, priority: str) -> bool:
        """Move a queued object to another class (operator command); False if not queued."""
        return self._queue.set_priority(object_id, self._quota.class_(priority))

    # ---- small persistent settings ---------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        with self._index.txn() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        return self._reports.get_meta(key)

    # ---- reporting (agent/store/reports.py) ------------------------------------------------

    def summary(self, now: float) -> dict[str, ClassSummary]:
        """Items and bytes per class and state, and the age of the oldest queued object."""
        return self._reports.summary(now)

    def chunk_counts(self) -> dict[str, tuple[int, int]]:
        """Chunk count and sealed bytes per chunk state."""
        return self._reports.chunk_counts()

    def savings(self) -> tuple[int, int]:
        """(compression, dedup) bytes saved over everything this store accepted."""
        return self._reports.savings()

    def pending_objects(self) -> int:
        return self._reports.pending_objects()
