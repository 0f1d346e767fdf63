"""The upload queue: claiming the most urgent work, handing it back, and recording what the
cloud acknowledged or what was found damaged.

The `mark_*` methods return the local files they let go; the store unlinks them after the
transaction (`release.remove_object_files`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from agent.config.settings import ClassSettings
from agent.store import release
from agent.store.index import Index
from agent.store.records import ChunkWork, ManifestWork, Work

# How many chunks past an object's next one a claim looks for one that fits a window's
# remaining budget.
LOOK_AHEAD = 16


class Queue:
    def __init__(self, index: Index) -> None:
        self._index = index
        self._manifests_inflight: set[str] = set()

    def next_work(self, now: float, aging_s: float, max_chunk_bytes: int | None,
                  max_manifest_bytes: int | None, *,
                  max_rank: int | None = None) -> Work | None:
        """A ready manifest first, then a chunk (caller holds the index lock); `max_rank`:
        of classes ranked this or better only."""
        return (self._next_manifest(max_manifest_bytes, max_rank)
                or self._next_chunk(now, aging_s, max_chunk_bytes, max_rank))

    def _next_manifest(self, max_bytes: int | None = None,
                       max_rank: int | None = None) -> ManifestWork | None:
        inflight = tuple(self._manifests_inflight | self._index.unpromoted)
        marks = ",".join("?" * len(inflight))
        exclude = f"AND id NOT IN ({marks})" if inflight else ""
        fits = "" if max_bytes is None else f"AND manifest_bytes <= {int(max_bytes)}"
        if max_rank is not None:
            fits += f" AND rank <= {int(max_rank)}"
        # Walks only objects whose chunks are all sent (those in flight are skipped: as many
        # as there are streams); manifests are small, so one that does not fit is rare.
        row = self._index.db.execute(
            f"SELECT id, created, class, manifest_bytes, manifest_hash FROM objects "
            f"INDEXED BY objects_ready WHERE state='queued' "
            f"AND chunks_left=0 {exclude} {fits} ORDER BY rank, created LIMIT 1",
            inflight,
        ).fetchone()
        if row is None:
            return None
        self._manifests_inflight.add(row[0])
        return ManifestWork(row[0], self._index.manifest_path(row[0]), row[1], row[2],
                            int(row[3]), row[4] or "")

    def _next_chunk(self, now: float, aging_s: float, max_bytes: int | None = None,
                    max_rank: int | None = None) -> ChunkWork | None:
        """The oldest object of each rank with a chunk to claim competes; aging lowers the
        rank of what waits, so the best `rank - age / aging_s` wins."""
        idx = self._index
        best: tuple[float, float, ChunkWork] | None = None
        for rank in self._sending_ranks():
            if max_rank is not None and rank > max_rank:
                continue  # the urgent stream claims only the most urgent classes
            work = self._first_claimable(rank, max_bytes)
            if work is None:
                continue
            created = work[0]
            effective = rank - max(0.0, now - created) / aging_s
            if best is None or (effective, created) < (best[0], best[1]):
                best = (effective, created, work[1])
        if best is None:
            return None
        with idx.txn(durable=False) as db:  # a claim does not outlive the process
            db.execute("UPDATE chunks SET state='uploading', attempts=attempts+1 WHERE id=?",
                       (best[2].chunk_id,))
        return best[2]

    def _sending_ranks(self) -> Iterator[int]:
        """The ranks that have objects with chunks to send, lowest first: one index seek each
        (a loose scan; SELECT DISTINCT would visit every such object)."""
        sql = ("SELECT MIN(rank) FROM objects INDEXED BY objects_sending WHERE state='queued' "
               "AND chunks_left>0 AND rank>?")
        rank = self._index.db.execute(sql, (-(1 << 62),)).fetchone()[0]
        while rank is not None:
            yield int(rank)
            rank = self._index.db.execute(sql, (rank,)).fetchone()[0]

    def _first_claimable(self, rank: int,
                         max_bytes: int | None) -> tuple[float, ChunkWork] | None:
        """The oldest object of `rank` with a sealed chunk that fits, and that chunk."""
        idx = self._index
        # Objects whose remaining chunks are all in flight are skipped; there are at most as
        # many of those as there are streams, so this walk stays short.
        cur = idx.db.execute(
            "SELECT id, created, class, manifest_bytes, unsent_from FROM objects "
            "INDEXED BY objects_sending WHERE state='queued' AND chunks_left>0 AND rank=? "
            "ORDER BY created LIMIT 256", (rank,))
        try:
            for oid, created, cls, mbytes, unsent_from in cur:
                room = 1 << 62 if max_bytes is None else max_bytes - int(mbytes)
                row = self._first_sealed(oid, int(unsent_from), room)
                if row is None or (idx.unpromoted and not idx.chunk_path(row[0]).exists()):
                    continue  # its file waits in a staging folder for room (disk full)
                return float(created), ChunkWork(row[0], idx.chunk_path(row[0]), row[1], row[2],
                                                 oid, cls, int(mbytes))
        finally:
            cur.close()
        return None

    def _first_sealed(self, object_id: str, unsent_from: int,
                      room: int) -> tuple[str, int, str] | None:
        """The first chunk of the object, in order, waiting to be sent and no larger than
        `room`. The walk starts at `unsent_from` (all before it are sent) and passes only the
        chunks in flight, so it does not grow with the object's size."""
        find = ("SELECT oc.seq, c.id, c.sealed_size, c.sealed_hash FROM object_chunks oc "
                "JOIN chunks c ON c.id=oc.chunk_id WHERE oc.object_id=? AND oc.seq>=? "
                "AND c.state='sealed' {} ORDER BY oc.seq LIMIT 1")
        row = self._index.db.execute(find.format(""), (object_id, unsent_from)).fetchone()
        if row is None or row[2] <= room:
            return None if row is None else (row[1], int(row[2]), row[3])
        # Near a window's end the next chunk may not fit while a smaller one further on does;
        # look a few chunks ahead only, so a budget smaller than every chunk costs little.
        row = self._index.db.execute(
            find.format("AND oc.seq<? AND c.sealed_size<=?"),
            (object_id, row[0] + 1, row[0] + 1 + LOOK_AHEAD, room)).fetchone()
        return None if row is None else (row[1], int(row[2]), row[3])

    def release_chunk(self, chunk_id: str) -> None:
        """An upload did not finish (cut, cancelled, failed): the chunk goes back in line."""
        with self._index.txn(durable=False) as db:
            db.execute("UPDATE chunks SET state='sealed' WHERE id=? AND state='uploading'",
                       (chunk_id,))

    def release_manifest(self, object_id: str) -> None:
        with self._index.lock:
            self._manifests_inflight.discard(object_id)

    def mark_chunk_uploaded(self, chunk_id: str) -> None:
        with self._index.txn() as db:
            cur = db.execute(
                "UPDATE chunks SET state='uploaded' WHERE id=? AND state!='uploaded'", (chunk_id,))
            if cur.rowcount:
                db.execute(
                    "UPDATE objects SET chunks_left=chunks_left-1 WHERE +state='queued' AND id IN "
                    "(SELECT DISTINCT object_id FROM object_chunks WHERE chunk_id=?)", (chunk_id,))
                # Move each object's `unsent_from` past the chunks now all sent: each chunk is
                # passed once over the object's life, and claims start there.
                db.execute(
                    "UPDATE objects SET unsent_from=COALESCE((SELECT oc.seq FROM object_chunks "
                    "oc JOIN chunks c ON c.id=oc.chunk_id WHERE oc.object_id=objects.id AND "
                    "oc.seq>=objects.unsent_from AND c.state!='uploaded' ORDER BY oc.seq "
                    "LIMIT 1), unsent_from) WHERE +state='queued' AND +chunks_left>0 AND id IN "
                    "(SELECT object_id FROM object_chunks WHERE chunk_id=?)", (chunk_id,))

    def mark_chunk_corrupt(self, chunk_id: str) -> dict[str, list[str]]:
        """The objects that need a damaged chunk become `damaged`; returns, per object, the
        chunk files let go (like an eviction's)."""
        freed: dict[str, list[str]] = {}
        with self._index.txn() as db:
            db.execute("UPDATE chunks SET state='corrupt' WHERE id=?", (chunk_id,))
            objs = [r[0] for r in db.execute(
                "SELECT DISTINCT o.id FROM object_chunks oc JOIN objects o ON o.id=oc.object_id "
                "WHERE oc.chunk_id=? AND o.state='queued'", (chunk_id,))]
            db.executemany("UPDATE objects SET state='damaged', finished=? WHERE id=?",
                           [(time.time(), o) for o in objs])
            for o in objs:
                freed[o] = release.drop_unneeded_chunks(self._index, db, o, drop_unsent=True)
        return freed

    def mark_manifest_corrupt(self, object_id: str) -> list[str]:
        """The local manifest file is damaged: the object can never be committed."""
        freed: list[str] = []
        with self._index.txn() as db:
            cur = db.execute("UPDATE objects SET state='damaged', finished=? WHERE id=? AND "
                             "state='queued'", (time.time(), object_id))
            if cur.rowcount:  # else evicted meanwhile: its bytes were already given back
                freed = release.drop_unneeded_chunks(self._index, db, object_id,
                                                     drop_unsent=True)
            self._manifests_inflight.discard(object_id)
        return freed

    def mark_committed(self, object_id: str) -> list[str]:
        """The cloud acknowledged the manifest: only now may the local copies go."""
        with self._index.txn() as db:
            row = db.execute("SELECT state FROM objects WHERE id=?", (object_id,)).fetchone()
            db.execute("UPDATE objects SET state='committed', finished=? WHERE id=?",
                       (time.time(), object_id))
            # Evicted while its manifest was in flight: its bytes were already given back.
            freed = (release.drop_unneeded_chunks(self._index, db, object_id, drop_unsent=False)
                     if row is not None and row[0] == "queued" else [])
            self._manifests_inflight.discard(object_id)
        return freed

    def set_priority(self, object_id: str, cls: ClassSettings) -> bool:
        """Move a queued object to another class (operator command); False if not queued."""
        with self._index.txn() as db:
            cur = db.execute("UPDATE objects SET class=?, rank=? WHERE id=? AND state='queued'",
                             (cls.name, cls.rank, object_id))
        return cur.rowcount > 0
