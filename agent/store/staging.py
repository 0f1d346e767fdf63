"""Ingest into the store: dedup lookups, the commit of a staged object into the index, and the
moves of its staged files into place (promotion).

A staged object's files and their staging entries are durable before its commit; the commit
is the moment its data counts as accepted. Promotion only renames, and is redone at start-up
(`recovery.reconcile`) or at the next claim (disk full) until it has happened."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from pathlib import Path

from agent.config.settings import ClassSettings
from agent.errors import DiskFullError, StoreError
from agent.store import room, seqbook
from agent.store.fsio import free_bytes, fsync_dir, is_disk_full
from agent.store.index import Index
from agent.store.records import StagedObject


class Staging:
    def __init__(self, index: Index) -> None:
        self._index = index
        self._chunk_folders: set[str] = set()  # chunks/<xx> folders known to exist

    def chunk_known(self, chunk_id: str, with_file: bool = False) -> bool:
        """True when this chunk is already queued or already in the cloud (dedup); with
        `with_file` (a dedup horizon), only when its local copy is still kept.

        Read without the store's lock: a chunk committed by another thread a moment ago may
        be missed, and is then sealed twice and dropped at commit (`insert_object`)."""
        row = self._index.reader().execute(
            "SELECT state, has_file FROM chunks WHERE id=?", (chunk_id,)).fetchone()
        return row is not None and row[0] != "corrupt" and (row[1] or not with_file)

    def accepted_source_key(self, source_key: str) -> str | None:
        """Object id already accepted for this source item (so a re-scan does not duplicate)."""
        db = self._index.reader()
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
        db = self._index.reader()
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

    def room_to_promote(self, staged: StagedObject) -> None:
        """Before the commit: make the chunk folders promotion needs and check the disk still
        has room for their entries, so a full disk refuses here rather than after it."""
        idx = self._index
        try:
            made = False
            for cid in staged.new_chunks:
                if cid[:2] in self._chunk_folders:  # chunk folders are never removed
                    continue
                folder = idx.chunk_path(cid).parent
                if not folder.is_dir():
                    folder.mkdir(exist_ok=True)
                    made = True
                self._chunk_folders.add(cid[:2])
            if made:
                fsync_dir(idx.chunks_dir)  # the new sub-folder's own entry must persist
        except OSError as e:
            if is_disk_full(e):
                raise room.disk_full_error(idx.state_dir, e) from e
            raise
        free = free_bytes(idx.state_dir)
        if free < room.COMMIT_ROOM_BYTES:
            raise DiskFullError(room.disk_full_message(idx.state_dir,
                                                       f"{free} bytes free at commit"))

    def insert_object(self, staged: StagedObject, cls: ClassSettings, stage: Path) -> int:
        """Insert rows; returns the sealed bytes of chunks this object really added."""
        added = 0
        with self._index.txn() as db:
            for cid, ch in staged.new_chunks.items():
                row = db.execute("SELECT state, has_file FROM chunks WHERE id=?",
                                 (cid,)).fetchone()
                if row is not None and row[0] != "corrupt" and (
                        row[1] or (row[0] == "uploaded" and not staged.keep_copies)):
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
            self._insert_rows(db, staged, cls)
        return added

    def _insert_rows(self, db: sqlite3.Connection, staged: StagedObject,
                     cls: ClassSettings) -> None:
        """The object's own rows, once its new chunks are in (same transaction)."""
        distinct = set(staged.chunk_ids)
        # With a dedup horizon a chunk shared with another object must keep its local copy.
        held = " AND has_file=1" if staged.keep_copies else ""
        missing = [c for c in distinct if c not in staged.new_chunks and db.execute(
            f"SELECT 1 FROM chunks WHERE id=? AND state!='corrupt'{held}", (c,)).fetchone() is None]
        if missing:
            raise StoreError(
                f"chunk {missing[0]} vanished from the store during ingest (evicted); "
                "the object stays at its source and will be ingested again"
            )
        sent = {c for c in distinct
                if db.execute("SELECT state FROM chunks WHERE id=?", (c,)).fetchone()[0]
                == "uploaded"}
        # Claims walk the object from here (agent/store/queue.py): past the chunks another
        # object already sent, so a re-ingest of a large file edited a little starts at its edit.
        unsent_from = next((i for i, c in enumerate(staged.chunk_ids) if c not in sent),
                           len(staged.chunk_ids))
        num = seqbook.committed(db, staged.object_id)
        db.execute(
            "INSERT INTO objects (id, source, source_key, class, rank, size, manifest_hash,"
            " manifest_bytes, created, state, chunks_left, items, stream, seq, unsent_from)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
            (staged.object_id, staged.source, staged.source_key, cls.name, cls.rank,
             staged.size, staged.manifest_hash, staged.manifest_bytes,
             staged.created or time.time(), len(distinct - sent),
             max(1, len(staged.member_keys)), num and num.stream, num and num.seq, unsent_from),
        )
        db.executemany(
            "INSERT INTO object_chunks (object_id, seq, chunk_id) VALUES (?, ?, ?)",
            [(staged.object_id, i, c) for i, c in enumerate(staged.chunk_ids)],
        )
        db.executemany(
            "INSERT OR IGNORE INTO object_sources (source_key, object_id) VALUES (?, ?)",
            [(k, staged.object_id) for k in staged.member_keys],
        )

    def abandon(self, object_id: str) -> None:
        """Throw away a staged ingest that will not be committed."""
        idx = self._index
        with idx.lock:
            committed = idx.db.execute(
                "SELECT 1 FROM objects WHERE id=?", (object_id,)).fetchone() is not None
        if committed:
            # The index already accepted it (promotion failed after the commit): its staged
            # files are the only copy, and the next start-up promotes them.
            return
        shutil.rmtree(idx.staging_path(object_id), ignore_errors=True)
        with contextlib.suppress(DiskFullError), idx.txn() as db:  # else: at next start-up
            seqbook.void_pending(db, object_id, "abandoned")


def move_into_place(index: Index, stage: Path) -> set[Path]:
    """The renames of a promotion; returns the folders whose entries changed."""
    touched: set[Path] = set()
    for f in stage.iterdir():
        if f.name == "manifest":
            dest = index.manifest_path(stage.name)
        elif f.name.startswith("."):
            f.unlink()
            continue
        else:
            dest = index.chunk_path(f.name)
            if not dest.parent.is_dir():
                dest.parent.mkdir(exist_ok=True)
                touched.add(index.chunks_dir)  # the new sub-folder's own entry must persist
        os.replace(f, dest)
        touched.add(dest.parent)
    stage.rmdir()
    touched.add(index.staging_dir)
    return touched


def sync_moves(touched: set[Path]) -> None:
    """Make moves into place durable (until then a crash leaves them in staging, and
    start-up promotes them again)."""
    for d in touched:
        fsync_dir(d)
