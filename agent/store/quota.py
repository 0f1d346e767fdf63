"""The store's quota: room reserved for ingests in progress, eviction by class policy, and
expiry of queued objects past their class TTL."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.config.settings import ClassSettings
from agent.errors import QuotaExceededError, StoreError
from agent.store import release, room
from agent.store.index import Index
from agent.store.records import Eviction

# Sealing adds a header and a tag to each chunk; manifests are small. Reserve with margin.
PER_CHUNK_OVERHEAD = 128


class Quota:
    """Reservations and evictions; `remove_files(object_id, chunk_ids)` unlinks what an
    eviction let go (the store's own step, shared with commits)."""

    def __init__(self, index: Index, classes: dict[str, ClassSettings], quota_bytes: int | None,
                 remove_files: Callable[[str, list[str]], None]) -> None:
        self._index = index
        self.classes = classes
        self.quota_bytes = quota_bytes
        self._remove_files = remove_files
        self._reserved = 0

    def class_(self, name: str) -> ClassSettings:
        try:
            return self.classes[name]
        except KeyError:
            raise StoreError(
                f"unknown priority class {name!r}; configured: {', '.join(self.classes)}"
            ) from None

    def reserve(self, nbytes: int, priority: str, max_chunk: int) -> tuple[int, list[Eviction]]:
        """Reserve room for an object of `nbytes`; evict per class policy or refuse.

        Returns the reserved amount (release it with `release`) and what was evicted.
        """
        cls = self.class_(priority)
        need = nbytes + (nbytes // max(1, max_chunk) + 2) * PER_CHUNK_OVERHEAD + 4096
        idx = self._index
        with idx.lock:
            evicted: list[Eviction] = []
            # first: never evict for a disk that refuses anyway
            room.check_disk_room(idx.state_dir, self._reserved, need)
            if self.quota_bytes is not None:
                # Evict only if that makes room: evicting and then refusing anyway would drop
                # data for nothing (an object larger than the quota would empty whole classes).
                over = idx.used + self._reserved + need - self.quota_bytes
                may_evict = over <= 0 or over <= self._freeable(cls)
                while idx.used + self._reserved + need > self.quota_bytes:
                    victim = self._eviction_candidate(cls) if may_evict else None
                    if victim is None:
                        raise QuotaExceededError(
                            f"state_dir quota of {self.quota_bytes} bytes is full "
                            f"({idx.used} used, {self._reserved} reserved, {need} needed) and "
                            f"class {priority!r} (policy {cls.policy}) may not evict enough to "
                            "make room; data stays at its source until the queue drains"
                        )
                    evicted.append(self._evict(victim, "quota"))
            self._reserved += need
            return need, evicted

    def release(self, reserved: int) -> None:
        with self._index.lock:
            self._reserved -= reserved

    def expire(self, now: float) -> list[Eviction]:
        """Drop queued objects older than their class TTL."""
        out: list[Eviction] = []
        for c in self.classes.values():
            if c.ttl_s is None:
                continue
            with self._index.lock:
                rows = self._index.db.execute(
                    "SELECT id FROM objects WHERE state='queued' AND class=? AND created<?",
                    (c.name, now - c.ttl_s),
                ).fetchall()
                out.extend(self._evict((r[0], c.name), "ttl") for r in rows)
        return out

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
        db = self._index.db
        manifests = db.execute(
            "SELECT COALESCE(SUM(manifest_bytes), 0) FROM objects WHERE state='queued' AND "
            f"class IN ({marks})", names).fetchone()[0]
        # As in release.drop_unneeded_chunks: a chunk another queued object still needs stays.
        chunks = db.execute(
            "SELECT COALESCE(SUM(sealed_size), 0) FROM chunks WHERE has_file=1 AND "
            f"id IN ({needed_by.format('')}) AND id NOT IN ({needed_by.format('NOT')})",
            names + names).fetchone()[0]
        return int(manifests) + int(chunks)

    def _eviction_candidate(self, incoming: ClassSettings) -> tuple[str, str] | None:
        for c in self._evictable(incoming):
            row = self._index.db.execute(
                "SELECT id FROM objects WHERE state='queued' AND class=? ORDER BY created LIMIT 1",
                (c.name,),
            ).fetchone()
            if row is not None:
                return row[0], c.name
        return None

    def _evict(self, victim: tuple[str, str], reason: str) -> Eviction:
        object_id, cls = victim
        with self._index.txn() as db:
            size = db.execute("SELECT size FROM objects WHERE id=?", (object_id,)).fetchone()[0]
            db.execute("UPDATE objects SET state=?, finished=? WHERE id=?",
                       ("evicted" if reason == "quota" else "expired", time.time(), object_id))
            freed_files = release.drop_unneeded_chunks(self._index, db, object_id,
                                                       drop_unsent=True)
        self._remove_files(object_id, freed_files)
        return Eviction(object_id, cls, int(size), reason)
