"""What the store reports: items and bytes per class and state, chunk counts, savings."""

from __future__ import annotations

from agent.store.index import Index
from agent.store.records import ClassSummary


class Reports:
    def __init__(self, index: Index, class_names: list[str]) -> None:
        self._index = index
        self._class_names = class_names

    def summary(self, now: float) -> dict[str, ClassSummary]:
        """Items (files, each file of a pack, MQTT batches) and bytes per class and state, and
        the age of the oldest queued object."""
        out: dict[str, ClassSummary] = {name: ClassSummary() for name in self._class_names}
        idx = self._index
        with idx.lock:
            rows = idx.db.execute(
                "SELECT class, state, SUM(items), COALESCE(SUM(size), 0) FROM objects "
                "GROUP BY class, state").fetchall()
            oldest = idx.db.execute(
                "SELECT class, MIN(created) FROM objects WHERE state='queued' GROUP BY class"
            ).fetchall()
        for cls, state, n, size in rows:
            s = out.setdefault(cls, ClassSummary())
            s.items[state] = int(n)
            s.bytes[state] = int(size)
        for cls, created in oldest:
            out.setdefault(cls, ClassSummary()).oldest_queued_age_s = max(0.0, now - created)
        return out

    def chunk_counts(self) -> dict[str, tuple[int, int]]:
        """Chunk count and sealed bytes per chunk state."""
        with self._index.lock:
            rows = self._index.db.execute(
                "SELECT state, COUNT(*), COALESCE(SUM(sealed_size), 0) FROM chunks "
                "GROUP BY state").fetchall()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def savings(self) -> tuple[int, int]:
        """(compression, dedup) bytes saved over everything this store accepted."""
        with self._index.lock:
            plain, sealed = self._index.db.execute(
                "SELECT COALESCE(SUM(plain_size), 0), COALESCE(SUM(sealed_size), 0) FROM chunks "
                "WHERE state!='corrupt'").fetchone()
            objects = self._index.db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM objects WHERE state IN ('queued','committed')"
            ).fetchone()[0]
        return int(plain) - int(sealed), max(0, int(objects) - int(plain))

    def pending_objects(self) -> int:
        with self._index.lock:
            return int(self._index.db.execute(
                "SELECT COUNT(*) FROM objects WHERE state='queued'").fetchone()[0])

    def get_meta(self, key: str) -> str | None:
        with self._index.lock:
            row = self._index.db.execute("SELECT value FROM meta WHERE key=?",
                                         (key,)).fetchone()
        return None if row is None else str(row[0])
