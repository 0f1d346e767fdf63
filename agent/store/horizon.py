"""The dedup horizon (docs/FORMAT.md, "Retention"): the promise that lets a cloud delete old
sealed objects, and what the store records to keep it.

- `chunk_confirmed`: per chunk, the edge time at which an upload began that wrote a copy of it
  (under its own key or as a re-sent copy). That copy's Last-Modified in the cloud is not
  earlier, so a cloud that deletes only what is older than the horizon plus a margin by its own
  clock cannot have deleted it within the horizon of that time, whatever the offset between
  the two clocks.
- meta `horizon:s`: the horizon in force (seconds); `horizon:since`: when the store began to
  keep a local copy of every chunk a queued object references; `horizon:active`: "1" once no
  object queued before `since` is left. From then on manifests declare the horizon, and the
  store never loosens it (a larger or no `dedup_horizon` later keeps the one declared).
- meta `horizon:high`: the latest edge time seen. A clock found below it stepped back, and every
  confirmation is forgotten (those chunks are re-sent before a manifest needs them).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

from agent.obs.logs import log_event

log = logging.getLogger("skyferry.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunk_confirmed (
    chunk_id TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
"""
CLOCK_TOLERANCE_S = 60.0  # a clock found this far below `horizon:high` has stepped back


@dataclass(frozen=True)
class Promise:
    horizon_s: float | None  # None: off (the store dedups against every chunk it knows)
    active: bool  # manifests declare it; it can no longer be loosened
    kept_from_config: float | None = None  # the configured horizon the promise overrides


@dataclass(frozen=True)
class StaleChunk:
    """A chunk of an object about to be sent whose last confirmed copy is past the horizon."""

    chunk_id: str
    has_file: bool
    sealed_size: int
    sealed_hash: str


def expired(confirmed: float | None, now: float, horizon_s: float) -> bool:
    """May a manifest sent at edge time `now` not reference a copy confirmed at `confirmed`?

    Exactly at the horizon it still may; never confirmed, or confirmed in this clock's future
    (it was fast then and has been set back), it may not.
    """
    if confirmed is None:
        return True
    return now - confirmed > horizon_s or confirmed > now + CLOCK_TOLERANCE_S


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set(db: sqlite3.Connection, key: str, value: str | None) -> None:
    if value is None:
        db.execute("DELETE FROM meta WHERE key=?", (key,))
    else:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def apply(db: sqlite3.Connection, configured: float | None, now: float) -> Promise:
    """Bring the store's promise in line with the configured horizon (inside a transaction)."""
    stored = _meta(db, "horizon:s")
    if _meta(db, "horizon:active") == "1" and stored is not None:
        kept = float(stored)
        h = kept if configured is None else min(kept, configured)
        _set(db, "horizon:s", repr(h))
        if configured is None or configured > kept:
            log_event(log, logging.WARNING, "dedup_horizon_kept",
                      f"dedup_horizon stays {kept:g}s: this store declared it in manifests "
                      "already sent, and a cloud may delete on its word (docs/FORMAT.md, "
                      "Retention)", configured=configured, kept=kept)
            return Promise(h, True, configured or 0.0)
        return Promise(h, True)
    if configured is None:
        for key in ("horizon:s", "horizon:since"):
            _set(db, key, None)
        return Promise(None, False)
    _set(db, "horizon:s", repr(configured))
    if _meta(db, "horizon:since") is None:
        _set(db, "horizon:since", repr(now))
    return Promise(configured, activate_if_ready(db))


def activate_if_ready(db: sqlite3.Connection) -> bool:
    """Active once every queued object was ingested while copies were kept (inside a txn)."""
    since = _meta(db, "horizon:since")
    if since is None:
        return False
    older = db.execute("SELECT 1 FROM objects WHERE state='queued' AND created < ? LIMIT 1",
                       (float(since),)).fetchone()
    if older is not None:
        return False
    _set(db, "horizon:active", "1")
    return True


def confirm(db: sqlite3.Connection, chunk_id: str, at: float) -> None:
    """A copy of `chunk_id` was written by an upload that began at edge time `at`."""
    db.execute("INSERT INTO chunk_confirmed (chunk_id, at) VALUES (?, ?) ON CONFLICT(chunk_id) "
               "DO UPDATE SET at=max(at, excluded.at)", (chunk_id, at))
    _watch_clock(db, at)


def stale_chunks(db: sqlite3.Connection, object_id: str, now: float,
                 horizon_s: float) -> list[StaleChunk]:
    """The chunks of `object_id` a manifest sent now may not reference without a re-send."""
    _watch_clock(db, now)
    rows = db.execute(
        "SELECT DISTINCT c.id, c.has_file, c.sealed_size, c.sealed_hash, cc.at "
        "FROM object_chunks oc JOIN chunks c ON c.id=oc.chunk_id "
        "LEFT JOIN chunk_confirmed cc ON cc.chunk_id=c.id WHERE oc.object_id=?",
        (object_id,)).fetchall()
    return [StaleChunk(cid, bool(has_file), int(size), str(sealed_hash))
            for cid, has_file, size, sealed_hash, at in rows if expired(at, now, horizon_s)]


def _watch_clock(db: sqlite3.Connection, now: float) -> None:
    """Forget every confirmation when the clock is found below the latest time it showed."""
    high = _meta(db, "horizon:high")
    if high is not None and now < float(high) - CLOCK_TOLERANCE_S:
        forgotten = db.execute("DELETE FROM chunk_confirmed").rowcount
        log_event(log, logging.WARNING, "clock_stepped_back",
                  "the clock is behind the latest time it showed: chunks are re-sent before "
                  "their next manifest (dedup horizon)", now=now, latest=float(high),
                  forgotten=forgotten)
        _set(db, "horizon:high", repr(now))
        return
    if high is None or now > float(high):
        _set(db, "horizon:high", repr(now))
