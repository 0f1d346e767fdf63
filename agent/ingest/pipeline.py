"""Ingest: a file, an in-memory batch or a pack of small files becomes a sealed object in the
store, accepted once durable.

The steps have modules of their own: opening the source (opening.py), cutting (cutting.py),
compressing (compressor.py), sealing and writing chunks (sealing.py), reading a pack's files
(packing.py). Everything here blocks (hashing, compression, encryption, fsync): call it through
the executor, never on the event loop.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import blake3

from agent.config.settings import ChunkingSettings, CompressionSettings
from agent.errors import IngestStoppedError, SourceError
from agent.format import crypto
from agent.format.crypto import EdgeKeys
from agent.format.manifest import (
    KIND_FILE,
    KIND_FILE_PACK,
    ChunkRef,
    Manifest,
    PackEntry,
    now_iso,
    uuid7,
    validate_name,
)
from agent.ingest.compressor import PIECE, Compressor
from agent.ingest.cutting import BufferPool, Cutter, Settle
from agent.ingest.opening import (
    CHANGED_WHILE_READ,
    NOT_STORED,
    open_source,
    same_content,
    stat_source,
)
from agent.ingest.packing import Member, MemberChanged, PackReader, plan_pack
from agent.ingest.requests import BatchRequest, IngestRequest, IngestResult, PackResult
from agent.ingest.sealing import (
    BATCH_MAX_LEVEL,
    SECOND_THREAD_MAX_LEVEL,
    ChunkWriters,
    chunk_ref,
    sealing_now,
    stage_manifest,
    write_chunk,
)
from agent.store import seqbook
from agent.store.fsio import StagingFolder, is_disk_full
from agent.store.store import Eviction, StagedChunk, StagedObject, Store


class Pipeline:
    def __init__(self, site: str, keys: EdgeKeys, store: Store, chunking: ChunkingSettings,
                 compression: CompressionSettings, *, seal_thread: Executor | None = None,
                 dedup_horizon_s: float | None = None) -> None:
        """`seal_thread`: one thread that seals a chunk while the calling thread cuts the next,
        owned by the caller (the daemon's `Executors`); without it each chunk is sealed by the
        thread that ingests. `dedup_horizon_s`: `[uplink] dedup_horizon` (docs/FORMAT.md,
        "Retention"); the store may keep a stricter one it has declared already."""
        self.site = site
        # Under a horizon every chunk an object references keeps a local copy until it is
        # sent, so one past the horizon can be re-sent (agent/uplink/horizon.py).
        self.keep_copies = store.apply_dedup_horizon(
            dedup_horizon_s, datetime.now(UTC).timestamp()).horizon_s is not None
        self.seal_thread = seal_thread
        self.keys = keys
        self.store = store
        self.chunking = chunking
        self.compressor = Compressor(compression)
        self.key_id = seqbook.key_id(keys.signing_key.public_key())  # names its seq stream
        self.buffers = BufferPool()
        self.cutter = Cutter(chunking)
        # Set at shutdown: a file being read is abandoned at the next chunk (it stays at its
        # source), so SIGTERM is not held up by a 50 GB ingest.
        self.stopping = threading.Event()

    def source_key(self, source: str, name: str, size: int, mtime_ns: int) -> str:
        """Identity of one version of a source item, keyed so it reveals nothing."""
        ident = f"{source}\0{name}\0{size}\0{mtime_ns}".encode()
        return crypto.keyed_hash(self.keys.dedup_key, ident)

    def is_packed(self, size: int) -> bool:
        """Files below `pack_below` are sealed together in packs (`ingest_pack`)."""
        return size < self.chunking.pack_below

    def _seal(self, staged: StagedObject, pieces: Callable[[Settle], Iterable[memoryview]],
              manifest: Callable[[tuple[ChunkRef, ...]], Manifest], stoppable: str | None
              ) -> tuple[ChunkRef, ...]:
        """Stage the pieces as chunks, then the manifest, and commit: the object is accepted.

        `pieces(settle)` cuts the object; it calls `settle` before it reuses the buffer its
        pieces point into. While fewer objects are being sealed than there are CPUs (the last
        large file of a batch, a lone 50 GB file), the sealing thread compresses, encrypts and
        writes chunks of this one, one at a time (at zstd levels up to SECOND_THREAD_MAX_LEVEL),
        while this thread cuts and seals the next (agent/ingest/sealing.py).
        `stoppable` names what is read when shutdown may abandon it (its data stays at the
        source); in-memory batches (None) are always finished.
        """
        stage = self.store.staging_path(staged.object_id)
        sealing = crypto.SealingKey.new(self.keys.recipient_public)  # one per object
        folder: StagingFolder | None = None
        with sealing_now() as spare_cpu:
            writers = ChunkWriters(self._write_chunk, staged.new_chunks, lambda: (
                spare_cpu() and self.compressor.level <= SECOND_THREAD_MAX_LEVEL),
                self.seal_thread)
            try:
                folder = StagingFolder(stage)
                refs = self._stage_chunks(stage, staged, pieces(writers.settle), writers,
                                          sealing, stoppable)
                writers.settle()
                m = self._numbered(staged, manifest(refs))
                staged.manifest_bytes, staged.manifest_hash = self._stage_manifest(stage, m)
                folder.sync([*staged.new_chunks, "manifest"])
                self.store.commit_object(staged)
            except BaseException as e:
                writers.abandon()
                self.store.abandon(staged.object_id)
                if is_disk_full(e):  # ENOSPC while staging: a refusal like a full quota
                    raise self.store.disk_full_error(e) from e
                raise
            finally:
                if folder is not None:
                    folder.close()
        return refs

    def _stage_chunks(self, stage: Path, staged: StagedObject, pieces: Iterable[memoryview],
                      writers: ChunkWriters, sealing: crypto.SealingKey, stoppable: str | None
                      ) -> tuple[ChunkRef, ...]:
        """The object's chunk references; each chunk not in the store yet is written."""
        refs: list[ChunkRef] = []
        fresh: set[str] = set()
        offset = 0
        for data in pieces:
            if stoppable is not None and self.stopping.is_set():
                raise IngestStoppedError(f"{stoppable}: ingest interrupted by shutdown; "
                                         "it stays at its source and is taken next start")
            ref = chunk_ref(self.keys, staged, data, offset)
            refs.append(ref)
            offset += len(data)
            if ref.id in fresh or self.store.chunk_known(ref.id, self.keep_copies):
                continue
            fresh.add(ref.id)
            writers.write(stage, ref.id, data, sealing)
        return tuple(refs)

    def _numbered(self, staged: StagedObject, m: Manifest) -> Manifest:
        """Number the manifest (a seq allocated durably now: if the object never commits, the
        store records it void) and date it after that, so seq order is `created` order."""
        num = self.store.allocate_seq(staged.object_id, self.key_id)
        created = now_iso()
        staged.created = datetime.fromisoformat(created).timestamp()  # its cloud date folder
        staged.keep_copies = self.keep_copies
        return replace(m.numbered(num.stream, num.seq, created),
                       horizon=self.store.horizon_to_declare())

    def _result(self, staged: StagedObject, refs: tuple[ChunkRef, ...],
                evicted: list[Eviction]) -> IngestResult:
        return IngestResult(
            staged.object_id, staged.size, len(refs), len(staged.new_chunks),
            sum(c.sealed_size for c in staged.new_chunks.values()) + staged.manifest_bytes,
            evicted=tuple(evicted),
        )

    def ingest_file(self, req: IngestRequest) -> IngestResult:
        """Seal one file into the store. Returns only after it is durable (accepted)."""
        st = stat_source(req)
        key = self.source_key(req.source, req.name, st.st_size, st.st_mtime_ns)
        previous = self.store.accepted_source_key(key)
        if previous is not None:
            return IngestResult(previous, st.st_size, 0, 0, 0, duplicate_of=previous)
        reserved, evicted = self.store.reserve(st.st_size, req.priority, self.chunking.max_size)
        staged = StagedObject(uuid7(), req.source, key, req.priority, st.st_size)
        whole = blake3.blake3()
        changed = SourceError(f"{req.path} {CHANGED_WHILE_READ}")

        def pieces(settle: Settle) -> Iterator[memoryview]:
            with io.FileIO(open_source(req, st), "rb") as f:
                for data in self.cutter.file_pieces(f, st.st_size, settle, buffer):
                    whole.update(data)
                    yield data
                after = os.fstat(f.fileno())  # the file read, whatever its name is now
            if not same_content(after, st):
                raise changed

        def manifest(refs: tuple[ChunkRef, ...]) -> Manifest:
            if sum(r.length for r in refs) != st.st_size:
                raise changed
            return Manifest(
                object_id=staged.object_id, site=self.site, source=req.source, kind=KIND_FILE,
                name=req.name, size=st.st_size, mtime_ns=st.st_mtime_ns,
                hash=whole.hexdigest(), priority=req.priority, created=now_iso(),
                chunks=refs, meta=dict(req.meta),
            )

        try:
            # Held until _seal returns: by then no chunk of it is being sealed any more.
            with self.buffers.lease(self.cutter.file_buffer) as buffer:
                refs = self._seal(staged, pieces, manifest, str(req.path))
        finally:
            self.store.release(reserved)
        return self._result(staged, refs, evicted)

    def ingest_batch(self, req: BatchRequest) -> IngestResult:
        """Seal an in-memory object into the store. Returns only after it is durable."""
        size = len(req.data)
        reserved, evicted = self.store.reserve(size, req.priority, self.chunking.max_size)
        staged = StagedObject(uuid7(), req.source, None, req.priority, size)
        name = f"{req.name_prefix}{staged.object_id}{req.name_suffix}"
        validate_name(name)

        def manifest(refs: tuple[ChunkRef, ...]) -> Manifest:
            return Manifest(
                object_id=staged.object_id, site=self.site, source=req.source, kind=req.kind,
                name=name, size=size, mtime_ns=req.mtime_ns,
                hash=crypto.content_hash(req.data), priority=req.priority, created=now_iso(),
                chunks=refs, meta=dict(req.meta),
            )

        try:
            # Capped: a batch comes whole from memory and is never abandoned at a stop, so
            # its compression must stay cheap (level 19 takes a core about a minute for 143 MiB,
            # and its context alone holds ~80 MiB).
            with self.compressor.capped(BATCH_MAX_LEVEL):
                refs = self._seal(staged, lambda _settle: self.cutter.memory_pieces(req.data),
                                  manifest, None)
        finally:
            self.store.release(reserved)
        return self._result(staged, refs, evicted)

    def ingest_pack(self, reqs: list[IngestRequest]) -> PackResult:
        """Seal small files of one source and class together as one object (a file pack).

        One manifest, one commit and one set of fsyncs for up to thousands of files, and chunks
        cut across file boundaries, so they compress as well as one big file. Each file keeps
        its own name, mtime, hash and source key (a re-scan does not duplicate it). A file that
        is unsafe, gone or changing is left at its source and named in `failed`; the rest are
        sealed without it. Returns only after the pack is durable.
        """
        plan = plan_pack(reqs, lambda req, st: self.source_key(
            req.source, req.name, st.st_size, st.st_mtime_ns), self.store.accepted_source_keys)
        members, keys, accepted, failed = plan.members, plan.keys, plan.accepted, plan.failed
        while members:
            try:
                return self._seal_pack(members, keys, accepted, failed)
            except MemberChanged as e:
                req = members.pop(e.index)[0]
                failed[req.name] = e.error or SourceError(f"{req.path} {e}; {NOT_STORED}")
        return PackResult(None, accepted, failed)

    def _seal_pack(self, members: list[Member],
                   keys: dict[str, str], accepted: dict[str, IngestResult],
                   failed: dict[str, SourceError]) -> PackResult:
        first = members[0][0]
        size = sum(st.st_size for _, st in members)
        reserved, evicted = self.store.reserve(size, first.priority, self.chunking.pack_max_size)
        staged = StagedObject(uuid7(), first.source, None, first.priority, size,
                              member_keys=[keys[r.name] for r, _ in members])
        reader = PackReader(members)
        whole = blake3.blake3()

        def pieces(settle: Settle) -> Iterator[memoryview]:
            for data in self.cutter.pack_pieces(reader, size, settle, buffer):
                whole.update(data)
                yield data
            reader.finish()

        def manifest(refs: tuple[ChunkRef, ...]) -> Manifest:
            entries, offset = [], 0
            for (req, st), digest in zip(members, reader.hashes, strict=True):
                entries.append(PackEntry(req.name, offset, st.st_size, st.st_mtime_ns, digest))
                offset += st.st_size
            return Manifest(
                object_id=staged.object_id, site=self.site, source=first.source,
                kind=KIND_FILE_PACK, name=f"{staged.object_id}.pack", size=size,
                mtime_ns=max(st.st_mtime_ns for _, st in members), hash=whole.hexdigest(),
                priority=first.priority, created=now_iso(), chunks=refs,
                entries=tuple(entries),
            )

        try:
            with self.buffers.lease(self.cutter.pack_buffer) as buffer:
                refs = self._seal(staged, pieces, manifest,
                                  f"a pack of {len(members)} files from {first.source}")
        finally:
            reader.close()
            self.store.release(reserved)
        one = self._result(staged, refs, evicted)
        for req, st in members:
            accepted[req.name] = IngestResult(staged.object_id, st.st_size, 0, 0, 0)
        return PackResult(staged.object_id, accepted, failed, size, one.chunks, one.new_chunks,
                          one.stored_bytes, one.evicted)

    def _write_chunk(self, stage: Path, cid: str, data: memoryview,
                     sealing: crypto.SealingKey) -> StagedChunk:
        """One chunk sealed with this pipeline's keys and compressor, through a pooled
        buffer (agent/ingest/sealing.py)."""
        with self.buffers.lease(PIECE + 64) as out:
            return write_chunk(stage, cid, data, sealing, self.keys, self.compressor, out())

    def _stage_manifest(self, stage: Path, manifest: Manifest) -> tuple[int, str]:
        return stage_manifest(stage, manifest, self.keys, self.compressor)
