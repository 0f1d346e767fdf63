"""The index's tables, its schema version and the migration of older indexes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.errors import StoreError
from agent.store import horizon, seqbook, totals

# 3: the queue's indexes, `unsent_from` and the running totals (agent/store/totals.py);
# 2: manifest numbering (agent/store/seqbook.py); 1 and 2 are migrated.
SCHEMA_VERSION = 3

SCHEMA = """
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


# What the uplink's claims walk, so that a claim costs O(log n) in the backlog, not a pass
# over it: objects with chunks still to send, in the order they are served (rank, then age);
# objects whose chunks are all sent, whose manifest goes next; the oldest queued object of a
# class (status, eviction, expiry).
QUEUE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS objects_sending ON objects(rank, created) "
    "WHERE state='queued' AND chunks_left>0",
    "CREATE INDEX IF NOT EXISTS objects_ready ON objects(rank, created) "
    "WHERE state='queued' AND chunks_left=0",
    "CREATE INDEX IF NOT EXISTS objects_class_age ON objects(class, created) "
    "WHERE state='queued'",
)


def migrate(db: sqlite3.Connection, state_dir: Path) -> None:
    """Create what is missing and bring an older index up to SCHEMA_VERSION, in one
    transaction (a crash halfway leaves the older index, upgraded again at the next start)."""
    db.executescript(SCHEMA + seqbook.SCHEMA + horizon.SCHEMA)  # horizon: FORMAT.md Retention
    version = _stored_version(db, state_dir)
    db.execute("BEGIN IMMEDIATE")
    try:
        _add_missing_columns(db)
        for statement in QUEUE_INDEXES:
            db.execute(statement)
        totals.install(db, rebuild=version != SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)",
                       (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Columns added after schema 1 shipped; old rows keep NULL (checked by size only)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(objects)")}
    if "manifest_hash" not in have:
        db.execute("ALTER TABLE objects ADD COLUMN manifest_hash TEXT")
    if "items" not in have:  # files in a pack; 1 for everything else
        db.execute("ALTER TABLE objects ADD COLUMN items INTEGER NOT NULL DEFAULT 1")
    if "unsent_from" not in have:  # chunks before this seq are all uploaded (agent/store/queue.py)
        db.execute("ALTER TABLE objects ADD COLUMN unsent_from INTEGER NOT NULL DEFAULT 0")
    seqbook.add_columns(db, have)


def _stored_version(db: sqlite3.Connection, state_dir: Path) -> int | None:
    """The index's schema (None: a new index); a newer one than ours is refused untouched."""
    row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is not None and int(row[0]) > SCHEMA_VERSION:
        raise StoreError(
            f"store {state_dir} has schema {row[0]}, this skyferry uses {SCHEMA_VERSION}; "
            "run the skyferry that wrote it, or a newer one"
        )
    return None if row is None else int(row[0])
