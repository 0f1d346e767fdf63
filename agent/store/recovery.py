"""Start-up recovery: make the index and the files agree after a crash or a power cut.

The cost grows with the work that was in flight only (claimed uploads, staged ingests,
pending deletes), not with the size of the queue."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from agent.store import room, seqbook, totals
from agent.store.index import Index


def reconcile(index: Index, promote: Callable[[Path], None]) -> None:
    """Reset claims, finish or drop staged ingests, finish deletes; `promote` moves a
    committed object's staged files into place (idempotent)."""
    with index.txn():
        index.db.execute("UPDATE chunks SET state='sealed' WHERE state='uploading'")
        # A seq allocated by an ingest that never committed (crash, kill) is void.
        seqbook.void_pending(index.db, None, "interrupted")
    for staged in list(index.staging_dir.iterdir()):
        if not staged.is_dir():
            staged.unlink()
            continue
        row = index.db.execute("SELECT 1 FROM objects WHERE id=?", (staged.name,)).fetchone()
        if row is None:
            shutil.rmtree(staged)  # never committed: the source still holds the data
        else:
            # Committed but not (durably) moved into place. A power cut can also have lost
            # moves whose files the uplink had since sent and let go: those stay gone.
            drop_released(index, staged)
            promote(staged)
    finish_pending_deletes(index)
    for tmp in index.manifests_dir.glob(".*.tmp"):
        tmp.unlink()
    index.used = compute_used(index)
    room.keep_spare(index.state_dir)


def finish_pending_deletes(index: Index) -> None:
    """Remove local copies a crash left behind after their release was committed."""
    rows = index.db.execute("SELECT kind, id FROM pending_deletes").fetchall()
    for kind, item in rows:
        if kind == "chunk":
            path = index.chunk_path(item)
            keep = index.db.execute(  # a later ingest may have brought the chunk back
                "SELECT 1 FROM chunks WHERE id=? AND has_file=1", (item,)).fetchone()
        else:
            path = index.manifest_path(item)
            keep = index.db.execute(
                "SELECT 1 FROM objects WHERE id=? AND state='queued'", (item,)).fetchone()
        if keep is None:
            path.unlink(missing_ok=True)
    if rows:
        with index.txn() as db:
            db.execute("DELETE FROM pending_deletes")


def compute_used(index: Index) -> int:
    """Sealed bytes of the chunk files and manifests the queue keeps (the running totals)."""
    files = sum(f for *_, f in totals.chunk_rows(index.db))
    manifests = sum(m for _, state, *_, m in totals.object_rows(index.db) if state == "queued")
    return files + manifests


def drop_released(index: Index, stage: Path) -> None:
    """Remove staged files the index no longer keeps locally (sent, or the object done)."""
    for f in stage.iterdir():
        if f.name == "manifest":
            row = index.db.execute("SELECT state FROM objects WHERE id=?",
                                   (stage.name,)).fetchone()
            gone = row is None or row[0] != "queued"
        elif f.name.startswith("."):
            continue
        else:
            row = index.db.execute("SELECT has_file FROM chunks WHERE id=?",
                                   (f.name,)).fetchone()
            gone = row is None or not row[0]
        if gone:
            f.unlink()
