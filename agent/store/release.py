"""Letting local copies go once no queued object needs them (committed, evicted, damaged).

The index records what to delete (`pending_deletes`) in the same transaction that lets the
copies go, so a crash before the unlinks cannot strand files (`recovery` finishes them)."""

from __future__ import annotations

import sqlite3

from agent.store.index import Index


def drop_unneeded_chunks(index: Index, db: sqlite3.Connection, object_id: str, *,
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
        index.used -= size
        freed.append(cid)
    row = db.execute("SELECT manifest_bytes FROM objects WHERE id=?", (object_id,)).fetchone()
    index.used -= int(row[0])
    # Recorded in the same transaction, so a crash before the unlinks cannot strand them.
    db.executemany("INSERT OR IGNORE INTO pending_deletes (kind, id) VALUES (?, ?)",
                   [("manifest", object_id), *(("chunk", c) for c in freed)])
    return freed


def remove_object_files(index: Index, object_id: str, chunk_ids: list[str]) -> None:
    """Unlink what `drop_unneeded_chunks` let go, then forget the pending deletes."""
    index.manifest_path(object_id).unlink(missing_ok=True)
    for cid in chunk_ids:
        index.chunk_path(cid).unlink(missing_ok=True)
    with index.txn() as db:
        db.execute("DELETE FROM pending_deletes WHERE kind='manifest' AND id=?", (object_id,))
        db.executemany("DELETE FROM pending_deletes WHERE kind='chunk' AND id=?",
                       [(c,) for c in chunk_ids])
