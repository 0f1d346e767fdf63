"""Running totals of the index: objects, items and bytes per class and state, chunks and bytes
per chunk state, kept by triggers in the transaction that changes a row.

The status summary, the count of pending objects and the bytes the queue holds (read at every
start-up) are then a few rows, not a pass over every object and chunk of a backlog that can
hold millions. Triggers rather than counters in Python: every writer, a read-only `skyferry
status`, an old row deleted by any future part of the store and a crash's rollback all see
totals that agree with the rows, with nothing to rebuild at start.
"""

from __future__ import annotations

import sqlite3

# Statements, not a script: `migrate` runs them inside its transaction (executescript would
# commit it first).
TABLES = (
    """CREATE TABLE IF NOT EXISTS object_totals (
        class TEXT NOT NULL,
        state TEXT NOT NULL,
        objects INTEGER NOT NULL,
        items INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        manifest_bytes INTEGER NOT NULL,
        PRIMARY KEY (class, state)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS chunk_totals (
        state TEXT PRIMARY KEY,
        chunks INTEGER NOT NULL,
        sealed_bytes INTEGER NOT NULL,
        plain_bytes INTEGER NOT NULL,
        file_bytes INTEGER NOT NULL
    ) WITHOUT ROWID""",
)

_ADD_OBJECT = """INSERT INTO object_totals VALUES (NEW.class, NEW.state, 1, NEW.items, NEW.size,
    NEW.manifest_bytes) ON CONFLICT (class, state) DO UPDATE SET objects=objects+1,
    items=items+excluded.items, bytes=bytes+excluded.bytes,
    manifest_bytes=manifest_bytes+excluded.manifest_bytes;"""
_SUB_OBJECT = """UPDATE object_totals SET objects=objects-1, items=items-OLD.items,
    bytes=bytes-OLD.size, manifest_bytes=manifest_bytes-OLD.manifest_bytes
    WHERE class=OLD.class AND state=OLD.state;"""
_ADD_CHUNK = """INSERT INTO chunk_totals VALUES (NEW.state, 1, NEW.sealed_size, NEW.plain_size,
    NEW.sealed_size * (NEW.has_file != 0)) ON CONFLICT (state) DO UPDATE SET chunks=chunks+1,
    sealed_bytes=sealed_bytes+excluded.sealed_bytes, plain_bytes=plain_bytes+excluded.plain_bytes,
    file_bytes=file_bytes+excluded.file_bytes;"""
_SUB_CHUNK = """UPDATE chunk_totals SET chunks=chunks-1, sealed_bytes=sealed_bytes-OLD.sealed_size,
    plain_bytes=plain_bytes-OLD.plain_size,
    file_bytes=file_bytes-OLD.sealed_size * (OLD.has_file != 0) WHERE state=OLD.state;"""

TRIGGERS = (
    f"CREATE TRIGGER IF NOT EXISTS objects_totals_insert AFTER INSERT ON objects "
    f"BEGIN {_ADD_OBJECT} END",
    f"CREATE TRIGGER IF NOT EXISTS objects_totals_delete AFTER DELETE ON objects "
    f"BEGIN {_SUB_OBJECT} END",
    f"CREATE TRIGGER IF NOT EXISTS objects_totals_update AFTER UPDATE OF class, state, items, "
    f"size, manifest_bytes ON objects BEGIN {_SUB_OBJECT} {_ADD_OBJECT} END",
    f"CREATE TRIGGER IF NOT EXISTS chunks_totals_insert AFTER INSERT ON chunks "
    f"BEGIN {_ADD_CHUNK} END",
    f"CREATE TRIGGER IF NOT EXISTS chunks_totals_delete AFTER DELETE ON chunks "
    f"BEGIN {_SUB_CHUNK} END",
    f"CREATE TRIGGER IF NOT EXISTS chunks_totals_update AFTER UPDATE OF state, sealed_size, "
    f"plain_size, has_file ON chunks BEGIN {_SUB_CHUNK} {_ADD_CHUNK} END",
)

# The same figures counted from the rows: to fill the totals of an index made before they
# existed, and for a read-only look at such an index (`skyferry status` before the daemon
# has upgraded it).
SCAN_OBJECTS = ("SELECT class, state, COUNT(*), SUM(items), COALESCE(SUM(size), 0), "
                "COALESCE(SUM(manifest_bytes), 0) FROM objects GROUP BY class, state")
SCAN_CHUNKS = ("SELECT state, COUNT(*), COALESCE(SUM(sealed_size), 0), "
               "COALESCE(SUM(plain_size), 0), COALESCE(SUM(sealed_size * (has_file != 0)), 0) "
               "FROM chunks GROUP BY state")


def install(db: sqlite3.Connection, *, rebuild: bool) -> None:
    """Create the tables and triggers; with `rebuild`, count the totals from the rows (an
    index from before schema 3). The caller holds the transaction."""
    for statement in (*TABLES, *TRIGGERS):
        db.execute(statement)
    if rebuild:
        db.execute("DELETE FROM object_totals")
        db.execute("DELETE FROM chunk_totals")
        db.execute(f"INSERT INTO object_totals {SCAN_OBJECTS}")
        db.execute(f"INSERT INTO chunk_totals {SCAN_CHUNKS}")


def has_totals(db: sqlite3.Connection) -> bool:
    """True when this index keeps the totals (schema 3 and later)."""
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                      "name='object_totals'").fetchone() is not None


ObjectRow = tuple[str, str, int, int, int, int]
ChunkRow = tuple[str, int, int, int, int]


def object_rows(db: sqlite3.Connection) -> list[ObjectRow]:
    """(class, state, objects, items, bytes, manifest bytes) for each class and state held."""
    sql = SCAN_OBJECTS if not has_totals(db) else (
        "SELECT class, state, objects, items, bytes, manifest_bytes FROM object_totals "
        "WHERE objects>0")
    return [(str(c), str(s), int(n), int(i), int(b), int(m))
            for c, s, n, i, b, m in db.execute(sql)]


def chunk_rows(db: sqlite3.Connection) -> list[ChunkRow]:
    """(state, chunks, sealed bytes, plain bytes, bytes of local files) per chunk state."""
    sql = SCAN_CHUNKS if not has_totals(db) else (
        "SELECT state, chunks, sealed_bytes, plain_bytes, file_bytes FROM chunk_totals "
        "WHERE chunks>0")
    return [(str(s), int(n), int(b), int(p), int(f)) for s, n, b, p, f in db.execute(sql)]
