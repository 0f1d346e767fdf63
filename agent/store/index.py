"""The store's one SQLite connection and what every part of the store shares through it: the
process lock on state_dir, the transaction, per-thread readers, the file layout, and the count
of bytes the queue holds on disk."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.errors import DiskFullError, StoreError, StoreLockedError
from agent.store import room
from agent.store.fsio import free_bytes, is_disk_full

LOCK_POLL_S = 0.05  # how often a waiting process tries the store lock again
log = logging.getLogger("skyferry.store")


class Index:
    """The connection and shared state of one store. Thread-safe: writers take `lock`."""

    def __init__(self, state_dir: Path, *, read_only: bool, lock_wait_s: float) -> None:
        self.state_dir = state_dir
        self.read_only = read_only
        self.lock = threading.RLock()
        # Per-thread read-only connections (WAL lets them read while a commit is written):
        # the ingest threads' dedup lookups do not wait for another thread's commit.
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock_fd: int | None = None
        self.used = 0  # sealed bytes of the local files the queue keeps (`recovery.compute_used`)
        self.unpromoted: set[str] = set()  # committed, files still in staging (disk full)
        self.chunks_dir = state_dir / "chunks"
        self.manifests_dir = state_dir / "manifests"
        self.staging_dir = state_dir / "staging"
        if read_only:
            index = state_dir / "index.sqlite"
            if not index.exists():
                raise StoreError(f"no skyferry store at {state_dir} (missing {index})")
            # as_uri() percent-encodes '#', '?' and '%' that would otherwise end the path
            self.db = sqlite3.connect(f"{index.absolute().as_uri()}?mode=ro", uri=True,
                                      check_same_thread=False, isolation_level=None)
            return
        for d in (state_dir, self.chunks_dir, self.manifests_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_fd = take_lock(state_dir, lock_wait_s)
        if free_bytes(state_dir) < room.SPARE_BYTES:
            room.give_up_spare(state_dir)  # opening the index needs blocks (-wal and -shm)
        try:
            self.db = sqlite3.connect(state_dir / "index.sqlite", check_same_thread=False,
                                      isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            if free_bytes(state_dir) >= room.COMMIT_ROOM_BYTES:
                raise
            raise DiskFullError(room.disk_full_message(
                state_dir, f"{e} opening the index")) from e
        self.db.execute("PRAGMA synchronous=FULL")

    def chunk_path(self, chunk_id: str) -> Path:
        return self.chunks_dir / chunk_id[:2] / chunk_id

    def manifest_path(self, object_id: str) -> Path:
        return self.manifests_dir / object_id

    def staging_path(self, object_id: str) -> Path:
        return self.staging_dir / object_id

    @contextmanager
    def txn(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction. `durable=False` skips the fsync of its commit, for changes a
        power cut may lose because start-up undoes them anyway (claims: `recovery.reconcile`
        puts every 'uploading' chunk back in line). SQLite keeps the index consistent either
        way (WAL with synchronous=NORMAL), and the next durable commit's fsync covers it."""
        with self.lock:
            if not durable:
                self.db.execute("PRAGMA synchronous=NORMAL")
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                    self.db.execute("COMMIT")  # inside: a COMMIT that fails must roll back too
                except BaseException as e:
                    # SQLite may already have rolled back by itself (SQLITE_FULL): a second
                    # ROLLBACK would fail and hide the real error.
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                    if is_disk_full(e):
                        raise room.disk_full_error(self.state_dir, e) from e
                    raise
            finally:
                if not durable:
                    self.db.execute("PRAGMA synchronous=FULL")

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (the main one for a read-only store)."""
        if self.read_only:
            return self.db
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            index = (self.state_dir / "index.sqlite").absolute()
            db = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True,
                                 check_same_thread=False, isolation_level=None)
            with self.lock:
                self._readers.append(db)
            self._local.db = db
        return db

    def close(self) -> None:
        with self.lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self.db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def take_lock(state_dir: Path, wait_s: float) -> int:
    """Hold the store's lock; wait up to `wait_s` for another process to let it go (a
    `skyferry put` writing directly while the daemon starts holds it for a moment)."""
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if wait_s > 0 and not told:  # a start that seems to hang says why
                told = True
                log.info("the store %s is in use by another skyferry process (a `skyferry "
                         "put` writing directly?); waiting up to %gs for it",
                         state_dir, wait_s, extra={"event": "store_lock_wait"})
            if time.monotonic() >= deadline:
                os.close(fd)
                waited = f" after waiting {wait_s:g}s" if wait_s > 0 else ""
                raise StoreLockedError(
                    f"the store {state_dir} is in use by another skyferry process "
                    f"(normally the running daemon){waited}; stop it or talk to it "
                    "through its socket") from None
            time.sleep(LOCK_POLL_S)
