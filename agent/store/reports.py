"""What the store reports: items and bytes per class and state, chunk counts, savings."""

from __future__ import annotations

from agent.store import totals
from agent.store.index import Index
from agent.store.records import ClassSummary


class Reports:
    def __init__(self, index: Index, class_names: list[str]) -> None:
        self._index = index
        self._class_names = class_names

    def summary(self, now: float) -> dict[str, ClassSummary]:
        """Items (files, each file of a pack, MQTT batches) and bytes per class and state, and
        the age of the oldest queued object: a few rows of the running totals and one index
        seek per class, whatever the backlog."""
        out: dict[str, ClassSummary] = {name: ClassSummary() for name in self._class_names}
        idx = self._index
        with idx.lock:
            rows = totals.object_rows(idx.db)
            queued = [cls for cls, state, n, *_ in rows if state == "queued" and n]
            # The partial index exists from schema 3; an older index (read-only status before
            # the daemon upgraded it) is searched as it was.
            hint = "INDEXED BY objects_class_age" if totals.has_totals(idx.db) else ""
            oldest = [(cls, idx.db.execute(
                f"SELECT MIN(created) FROM objects {hint} WHERE state='queued' AND class=?",
                (cls,)).fetchone()[0]) for cls in queued]
        for cls, state, _, n, size, _ in rows:
            s = out.setdefault(cls, ClassSummary())
            s.items[state] = n
            s.bytes[state] = size
        for cls, created in oldest:
            if created is not None:
                out.setdefault(cls, ClassSummary()).oldest_queued_age_s = max(0.0, now - created)
        return out

    def chunk_counts(self) -> dict[str, tuple[int, int]]:
        """Chunk count and sealed bytes per chunk state."""
        with self._index.lock:
            rows = totals.chunk_rows(self._index.db)
        return {state: (n, sealed) for state, n, sealed, _, _ in rows}

    def savings(self) -> tuple[int, int]:
        """(compression, dedup) bytes saved over everything this store accepted."""
        with self._index.lock:
            chunks = totals.chunk_rows(self._index.db)
            objects = totals.object_rows(self._index.db)
        plain = sum(p for state, _, _, p, _ in chunks if state != "corrupt")
        sealed = sum(s for state, _, s, _, _ in chunks if state != "corrupt")
        accepted = sum(b for _, state, _, _, b, _ in objects if state in ("queued", "committed"))
        return plain - sealed, max(0, accepted - plain)

    def pending_objects(self) -> int:
        with self._index.lock:
            rows = totals.object_rows(self._index.db)
        return sum(n for _, state, n, *_ in rows if state == "queued")

    def get_meta(self, key: str) -> str | None:
        with self._index.lock:
            row = self._index.db.execute("SELECT value FROM meta WHERE key=?",
                                         (key,)).fetchone()
        return None if row is None else str(row[0])
