"""The site's manifest numbering, kept in the store's index (docs/FORMAT.md, "History").

Every manifest a site signs carries `stream` and `seq`: seq counts 1, 2, 3, ... within a
stream, and a stream is one store's numbering for one signing key (a new key or a rebuilt store
starts a new stream, so seq 1 is never signed twice by an honest site). A seq is allocated
durably before its manifest is signed; if the ingest then never commits (source changed, disk
full, shutdown, crash) or the object is dropped before upload (quota, ttl, damage), the seq is
*void*: the site's tip object says so, and the cloud never reports it as a gap.

Functions here take the store's connection inside its transaction (the store's parts call them);
nothing here opens files.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

import blake3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    key_id TEXT PRIMARY KEY,
    stream TEXT NOT NULL UNIQUE,
    next_seq INTEGER NOT NULL,
    next_tip INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seq_pending (
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    object_id TEXT NOT NULL UNIQUE,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seq_void (
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
"""
# After `objects` has its seq/stream columns (`add_columns`).
# Tips read queued and dropped seqs of a stream by state: without `state` in the index that
# is a scan of every object the stream ever had.
INDEXES = "CREATE INDEX IF NOT EXISTS objects_seq ON objects(stream, state, seq);"

# Object states whose manifest will never be uploaded (agent/store/store.py, "States").
DROPPED_STATES = ("evicted", "expired", "damaged")

Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class Numbered:
    """What an ingest's manifest is numbered with."""

    stream: str
    seq: int


@dataclass(frozen=True)
class HistoryState:
    """What a tip says about one stream."""

    stream: str
    next_tip: int  # the number the next tip object gets
    highest: int  # highest seq issued (0: none yet)
    queued: Ranges  # seqs at the site, not (known to be) uploaded: queued or being ingested
    void: Ranges  # seqs that will never have a manifest


def key_id(public: Ed25519PublicKey) -> str:
    """Names a signing key in the store (its numbering is per key): BLAKE3 of the raw key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return blake3.blake3(raw).hexdigest()[:32]


def add_columns(db: sqlite3.Connection, have: set[str]) -> None:
    """Schema 1 -> 2: objects remember their seq (NULL for objects committed before)."""
    if "seq" not in have:
        db.execute("ALTER TABLE objects ADD COLUMN seq INTEGER")
    if "stream" not in have:
        db.execute("ALTER TABLE objects ADD COLUMN stream TEXT")
    db.execute(INDEXES)  # not executescript: it would commit the caller's transaction


def allocate(db: sqlite3.Connection, key_id: str, object_id: str) -> Numbered:
    """The next seq of this key's stream, recorded as pending for `object_id`."""
    row = db.execute("SELECT stream, next_seq FROM history WHERE key_id=?",
                     (key_id,)).fetchone()
    if row is None:
        stream, seq = os.urandom(16).hex(), 1
        db.execute("INSERT INTO history (key_id, stream, next_seq, next_tip) VALUES (?,?,2,1)",
                   (key_id, stream))
    else:
        stream, seq = str(row[0]), int(row[1])
        db.execute("UPDATE history SET next_seq=? WHERE key_id=?", (seq + 1, key_id))
    db.execute("INSERT INTO seq_pending (stream, seq, object_id) VALUES (?, ?, ?)",
               (stream, seq, object_id))
    return Numbered(stream, seq)


def committed(db: sqlite3.Connection, object_id: str) -> Numbered | None:
    """At commit: the object's pending seq is now the object's (returned for its row)."""
    row = db.execute("SELECT stream, seq FROM seq_pending WHERE object_id=?",
                     (object_id,)).fetchone()
    if row is None:
        return None
    db.execute("DELETE FROM seq_pending WHERE object_id=?", (object_id,))
    return Numbered(str(row[0]), int(row[1]))


def void_pending(db: sqlite3.Connection, object_id: str | None, reason: str) -> int:
    """Void the pending seq of an ingest that will not commit (all of them when None: at
    start-up, every pending seq belongs to an ingest a crash or stop cut short)."""
    where, args = ("WHERE object_id=?", (object_id,)) if object_id is not None else ("", ())
    db.execute(f"INSERT OR IGNORE INTO seq_void (stream, seq, reason) "
               f"SELECT stream, seq, ? FROM seq_pending {where}", (reason, *args))
    return db.execute(f"DELETE FROM seq_pending {where}", args).rowcount


def _ranges(db: sqlite3.Connection, seqs_sql: str, args: tuple[object, ...]) -> Ranges:
    """Consecutive runs of the seqs a query gives (gaps and islands, in SQL: a backlog can
    hold millions of seqs, its ranges are few)."""
    rows = db.execute(
        f"SELECT MIN(seq), MAX(seq) FROM (SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) "
        f"AS grp FROM ({seqs_sql})) GROUP BY grp ORDER BY 1", args).fetchall()
    return [(int(a), int(b)) for a, b in rows]


def state(db: sqlite3.Connection, key_id: str) -> HistoryState | None:
    """The stream of `key_id` as a tip reports it; None before its first manifest."""
    row = db.execute("SELECT stream, next_seq, next_tip FROM history WHERE key_id=?",
                     (key_id,)).fetchone()
    if row is None:
        return None
    stream = str(row[0])
    queued = _ranges(db, "SELECT seq FROM objects WHERE stream=?1 AND state='queued' "
                         "UNION SELECT seq FROM seq_pending WHERE stream=?1", (stream,))
    marks = ",".join(f"'{s}'" for s in DROPPED_STATES)
    void = _ranges(db, f"SELECT seq FROM objects WHERE stream=?1 AND state IN ({marks}) "
                       "UNION SELECT seq FROM seq_void WHERE stream=?1", (stream,))
    return HistoryState(stream, int(row[2]), int(row[1]) - 1, queued, void)


def tip_sent(db: sqlite3.Connection, stream: str, n: int) -> None:
    """Tip `n` of the stream is in the cloud: the next one is n + 1."""
    db.execute("UPDATE history SET next_tip=? WHERE stream=? AND next_tip<=?", (n + 1, stream, n))
