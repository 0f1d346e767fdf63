"""Chunk, hash, compress, seal and stage an object, then commit it to the store.

Everything here blocks (hashing, compression, encryption, fsync): call it through the
executor, never on the event loop.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import blake3
import zstandard
from pyfastcdc import FastCDC

from agent.config.settings import ChunkingSettings, CompressionSettings
from agent.errors import FormatError, IngestStoppedError, SourceError, UnsafePathError
from agent.format import crypto
from agent.format.crypto import EdgeKeys
from agent.format.manifest import (
    KIND_FILE,
    KIND_FILE_PACK,
    KIND_MQTT_BATCH,
    ChunkRef,
    Manifest,
    PackEntry,
    now_iso,
    uuid7,
    validate_name,
)
from agent.store import seqbook
from agent.store.fsio import StagingFolder, is_disk_full, new_file, write_new
from agent.store.store import Eviction, StagedChunk, StagedObject, Store

# Opens the source file and returns a descriptor the pipeline then owns (and closes).
Opener = Callable[[], int]

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class IngestRequest:
    """One file to ingest.

    `path` names it in messages. By default the pipeline opens `path` itself (never through a
    symbolic link). A source that must not open paths by name (a spool folder a producer
    controls, a descriptor passed over the put socket) gives `opener`, and `seen`: the file's
    status as the source saw it. The descriptor the opener returns must be that same file
    (device and inode) or the request is refused.
    """

    path: Path
    source: str
    name: str  # relative POSIX name kept in the manifest
    priority: str
    meta: dict[str, str] = field(default_factory=dict)
    opener: Opener | None = None
    seen: os.stat_result | None = None


@dataclass(frozen=True)
class BatchRequest:
    """An in-memory object (a batch of MQTT messages as JSON Lines), sealed like a file."""

    data: bytes
    source: str
    priority: str
    name_prefix: str  # the name is name_prefix + object id + name_suffix
    name_suffix: str
    mtime_ns: int  # receive time of the newest message
    kind: str = KIND_MQTT_BATCH
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestResult:
    object_id: str
    size: int
    chunks: int
    new_chunks: int
    stored_bytes: int  # sealed bytes this object added to the store
    duplicate_of: str | None = None  # set when the same source item was accepted before
    evicted: tuple[Eviction, ...] = ()


_PIECE = 1 << 20  # a chunk is compressed, sealed and written this much at a time


def _slices(data: memoryview, size: int) -> Iterator[memoryview]:
    for at in range(0, len(data), size):
        yield data[at:at + size]


FAST_LEVEL = 1  # whether data compresses at all shows at the fastest level
LDM_WINDOW_LOG = 24  # with long-distance matching, matches may reach across a whole 16 MiB chunk


class Compressor:
    """zstd that keeps a chunk compressed only where level 1 shows it is worth it.

    The level is the configured one, or with `level = "auto"` whatever `set_level` last chose
    (agent/ingest/compression_policy.py); it applies from the next chunk on.
    """

    def __init__(self, settings: CompressionSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        level = 1 if settings.level == "auto" else settings.level
        self._setting: tuple[int, bool] = (level, False)  # swapped whole: no lock needed

    @property
    def level(self) -> int:
        return self._setting[0]

    @property
    def long_distance(self) -> bool:
        return self._setting[1]

    def set_level(self, level: int, long_distance: bool = False) -> None:
        """Seal the chunks begun from now on at this level (thread-safe)."""
        if not 1 <= level <= 22:
            raise ValueError(f"zstd level {level} is not between 1 and 22")
        self._setting = (level, long_distance)

    def _zstd(self, level: int | None = None, long_distance: bool = False
              ) -> zstandard.ZstdCompressor:
        key = self._setting if level is None else (level, long_distance)
        cache: dict[tuple[int, bool], zstandard.ZstdCompressor] | None = getattr(
            self._local, "zstd", None)
        if cache is None:
            cache = self._local.zstd = {}
        c = cache.get(key)
        if c is None:
            # A thread keeps level 1 (every chunk is judged at it) and the level in use: a
            # level-19 context holds ~50-80 MiB, so contexts of levels left behind are let go.
            fast = (FAST_LEVEL, False)
            for old in [k for k in cache if fast not in (k, key)]:
                del cache[old]
            if key[1]:
                params = zstandard.ZstdCompressionParameters.from_level(
                    key[0], enable_ldm=True, window_log=LDM_WINDOW_LOG)
                c = zstandard.ZstdCompressor(compression_params=params)
            else:
                c = zstandard.ZstdCompressor(level=key[0])
            cache[key] = c
        return c

    def compress(self, data: bytes | memoryview, level: int | None = None,
                 long_distance: bool = False) -> tuple[int, bytes | memoryview]:
        """Return (compression id, payload); an uncompressed payload is a view of `data`.

        Level 1 first, on all of `data`: it gives up on incompressible data at GB/s, and judges
        a chunk that mixes files (a pack's) better than a sample of its start would. The
        payload stays uncompressed unless that shrinks it below min_ratio; at a higher level
        the smaller of the two frames is kept.
        """
        # No bytes(data) copy (up to 16 MiB per ingest thread): the caller reads the view
        # before its buffer moves on.
        fast = self._zstd(FAST_LEVEL).compress(data)
        if len(fast) > len(data) * self.settings.min_ratio:
            return crypto.COMPRESSION_NONE, memoryview(data)
        key = self._setting if level is None else (level, long_distance)
        cap: int | None = getattr(self._local, "cap", None)
        if cap is not None and key[0] > cap:
            key = (cap, False)
        if key == (FAST_LEVEL, False):
            return crypto.COMPRESSION_ZSTD, fast
        packed = self._zstd(*key).compress(data)
        return crypto.COMPRESSION_ZSTD, packed if len(packed) < len(fast) else fast

    @contextmanager
    def capped(self, level: int) -> Iterator[None]:
        """Chunks this thread compresses meanwhile use at most `level`."""
        previous = getattr(self._local, "cap", None)
        self._local.cap = level
        try:
            yield
        finally:
            self._local.cap = previous

    def payload(self, data: memoryview) -> tuple[int, Iterator[bytes | memoryview]]:
        """A chunk's (compression id, payload in pieces of at most _PIECE bytes).

        Compressed in one call (zstd's fastest path: no copy into its window, no wrapped
        window); a chunk is at most 16 MiB (`[chunking] max_size`), so is its payload.
        """
        compression, packed = self.compress(data)
        return compression, _slices(memoryview(packed), _PIECE)


def decompress(compression: int, payload: bytes, plaintext_len: int) -> bytes:
    """Undo `Compressor.compress`; the caller bounds `plaintext_len` before calling."""
    if compression == crypto.COMPRESSION_NONE:
        if len(payload) != plaintext_len:
            raise FormatError(f"payload is {len(payload)} bytes, header says {plaintext_len}")
        return payload
    try:
        # The frame's own size field must agree with the authenticated header: zstandard
        # trusts that field over max_output_size, so checking it first bounds memory.
        declared = zstandard.frame_content_size(payload)
        if declared != plaintext_len:
            raise FormatError(f"zstd frame declares {declared} bytes, header says {plaintext_len}")
        data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=plaintext_len)
    except zstandard.ZstdError as e:
        raise FormatError(f"compressed payload is damaged: {e}") from None
    if len(data) != plaintext_len:
        raise FormatError(f"payload decompressed to {len(data)} bytes, header says {plaintext_len}")
    return data


Settle = Callable[[], None]
# The second thread holds a zstd context of its own: ~1-3 MiB up to level 3, but ~50-80 MiB at
# level 19, which took `auto`'s link-bound peak RSS from 355 to 440 MiB (benchmarks.compression);
# at such levels the link, not ingest, is the bottleneck anyway.
SECOND_THREAD_MAX_LEVEL = 3
BATCH_MAX_LEVEL = 9  # in-memory batches (MQTT): ~40 MB/s a core, a ~10 MiB context

_CPUS = len(os.sched_getaffinity(0))
_computing = 0  # objects of this process being sealed now, from cutting to commit
_computing_lock = threading.Lock()
_second: ThreadPoolExecutor | None = None


def _second_thread() -> ThreadPoolExecutor:
    """The thread that seals chunks of an object sealed while a CPU is spare (one for all
    pipelines of the process: it is about the CPUs, not the store)."""
    global _second
    with _computing_lock:
        if _second is None:
            _second = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyferry-seal")
        return _second


@contextmanager
def _sealing_now() -> Iterator[Callable[[], bool]]:
    """Count an object as being sealed; yields "is a CPU spare for it?"."""
    global _computing
    with _computing_lock:
        _computing += 1
    try:
        yield lambda: _computing < _CPUS
    finally:
        with _computing_lock:
            _computing -= 1


class _Readable(Protocol):
    def readinto(self, view: memoryview, /) -> int | None: ...


# A spool takes the file again by itself once it settles; a put must be sent again.
NOT_STORED = ("it was not stored: a spool file is taken once it stops changing, a "
              "`skyferry put` must be run again then")
CHANGED_WHILE_READ = f"changed while it was being read; {NOT_STORED}"


class _MemberChanged(Exception):
    """A file of a pack changed, shrank or vanished while it was read."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(why)
        self.index = index


class _PackReader:
    """The files of a pack read one after another as one stream, each hashed on the way.

    Reads stop at each file's size as it was when the pack was planned, and the file is checked
    afterwards: one that changed is reported, so the pack is sealed again without it.
    """

    def __init__(self, members: list[tuple[IngestRequest, os.stat_result]]) -> None:
        self.members = members
        self.hashes: list[str] = []
        self._i = 0
        self._f: io.FileIO | None = None
        self._left = 0
        self._hash = blake3.blake3()

    def readinto(self, view: memoryview, /) -> int:
        while self._i < len(self.members):
            req, st = self.members[self._i]
            if self._f is None:
                try:
                    self._f = io.FileIO(open_source(req, st), "rb")
                except SourceError as e:
                    raise _MemberChanged(self._i, str(e)) from None
                self._left, self._hash = st.st_size, blake3.blake3()
            n = self._f.readinto(view[:self._left]) if self._left else 0
            if n:
                self._hash.update(view[:n])
                self._left -= n
                return n
            self._finish_member(st)
        return 0

    def _finish_member(self, st: os.stat_result) -> None:
        assert self._f is not None
        try:
            after = os.fstat(self._f.fileno())
        finally:
            self._f.close()
            self._f = None
        if self._left or not same_content(after, st):
            raise _MemberChanged(self._i, "changed while it was being read")
        self.hashes.append(self._hash.hexdigest())
        self._i += 1

    def finish(self) -> None:
        """After the last byte: check the files not yet checked (the last, empty ones)."""
        if self.readinto(memoryview(bytearray(1))):
            raise _MemberChanged(self._i, "grew while it was being read")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def same_content(a: os.stat_result, b: os.stat_result) -> bool:
    """Nothing suggests the file was written between the two: same size, mtime and ctime."""
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def open_source(req: IngestRequest, seen: os.stat_result) -> int:
    """A descriptor of the file `seen` describes, or SourceError: never a file swapped in
    under the same name, never through a symbolic link, never a FIFO that would block."""
    try:
        fd = req.opener() if req.opener is not None else os.open(req.path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise SourceError(f"{req.path} disappeared before it could be read") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SourceError(f"{req.path} is a symbolic link; links are not followed") from None
        raise SourceError(f"{req.path} could not be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not same_file(st, seen):
            raise SourceError(f"{req.path} was replaced by another file before it could be "
                              "read; the new one is looked at again")
        if not same_content(st, seen):
            raise SourceError(f"{req.path} changed before it could be read; {NOT_STORED}")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class PackResult:
    """What became of each file offered to `ingest_pack`, by name."""

    object_id: str | None  # the new pack, None when nothing new was sealed
    accepted: dict[str, IngestResult]  # sealed into the pack, or accepted before
    failed: dict[str, SourceError]  # left at the source, with the reason
    size: int = 0  # bytes sealed into the pack
    chunks: int = 0
    new_chunks: int = 0
    stored_bytes: int = 0
    evicted: tuple[Eviction, ...] = ()


class Pipeline:
    def __init__(self, site: str, keys: EdgeKeys, store: Store, chunking: ChunkingSettings,
                 compression: CompressionSettings) -> None:
        self.site = site
        self.keys = keys
        self.store = store
        self.chunking = chunking
        self.compressor = Compressor(compression)
        self.key_id = seqbook.key_id(keys.signing_key.public_key())  # names its seq stream
        self._local = threading.local()
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

    def _buffer(self, want: int) -> bytearray:
        # One reusable buffer per thread and size: pyfastcdc's cut_stream zero-fills a fresh
        # one per file, which cost ~35 ms a file; mmap (cut_file) would SIGBUS on a truncated
        # file. Cuts do not depend on the size as long as it exceeds max_size (each pass
        # restarts at a cut); max + 2 avg instead of 2 max saved 16 MiB of peak RSS.
        bufs: dict[int, bytearray] | None = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        buf = bufs.get(want)
        if buf is None:
            buf = bufs[want] = bytearray(want)
        return buf

    def _cut(self, f: _Readable, size: int, low: int, avg: int, high: int,
             settle: Settle) -> Iterator[memoryview]:
        """Content-defined pieces of a stream. Views stay valid until `settle` has been called:
        it is, just before the buffer they point into is reused."""
        if size == 0:
            return
        if size <= low:  # FastCDC never cuts below min_size
            data = bytearray(size)
            view = memoryview(data)
            filled = 0
            while filled < size and (n := f.readinto(view[filled:])):
                filled += n
            yield view[:filled]
            return
        buf = self._buffer(high + 2 * avg)
        view = memoryview(buf)
        # pyfastcdc's average excludes the minimum (cut-point skipping), hence avg - min.
        cutter = FastCDC(avg - low, min_size=low, max_size=high)
        filled, eof = 0, False
        while True:
            while not eof and filled < len(buf):
                n = f.readinto(view[filled:])
                eof = not n
                filled += n or 0
            start = 0
            for piece in cutter.cut_buf(view[:filled]):
                end = piece.offset + piece.length
                if end == filled and not eof:
                    break  # may be cut short by the buffer's end: cut again with more data
                yield view[piece.offset:end]
                start = end
            if eof and start == filled:
                return
            settle()
            tail = filled - start
            view[:tail] = view[start:filled]  # one memmove, no temporary copy
            filled = tail

    def _file_pieces(self, f: _Readable, size: int, settle: Settle
                     ) -> Iterator[memoryview]:
        c = self.chunking
        return self._cut(f, size, c.min_size, c.avg_size, c.max_size, settle)

    def _memory_pieces(self, data: bytes) -> Iterator[memoryview]:
        """Content-defined pieces of an in-memory object: views into it, the same cuts as
        `_file_pieces` (no copy into a cut buffer: up to 24 MiB less per batch)."""
        c = self.chunking
        view = memoryview(data)
        if len(view) <= c.min_size:
            if view:
                yield view
            return
        cutter = FastCDC(c.avg_size - c.min_size, min_size=c.min_size, max_size=c.max_size)
        for piece in cutter.cut_buf(view):
            yield view[piece.offset:piece.offset + piece.length]

    def _pack_pieces(self, f: _Readable, size: int, settle: Settle
                     ) -> Iterator[memoryview]:
        c = self.chunking
        return self._cut(f, size, c.pack_min_size, c.pack_avg_size, c.pack_max_size, settle)

    def _seal(self, staged: StagedObject, pieces: Callable[[Settle], Iterable[memoryview]],
              manifest: Callable[[tuple[ChunkRef, ...]], Manifest], stoppable: str | None
              ) -> tuple[ChunkRef, ...]:
        """Stage the pieces as chunks, then the manifest, and commit: the object is accepted.

        `pieces(settle)` cuts the object; it calls `settle` before it reuses the buffer its
        pieces point into. While fewer objects are being sealed than there are CPUs (the last
        large file of a batch, a lone 50 GB file), a second thread compresses, encrypts and
        writes chunks of this one, one at a time (at zstd levels up to SECOND_THREAD_MAX_LEVEL),
        while this thread cuts and seals the next.
        `stoppable` names what is read when shutdown may abandon it (its data stays at the
        source); in-memory batches (None) are always finished.
        """
        stage = self.store.staging_path(staged.object_id)
        sealing = crypto.SealingKey.new(self.keys.recipient_public)  # one per object
        folder: StagingFolder | None = None
        pending: Future[StagedChunk] | None = None  # the chunk the second thread works on

        def settle() -> None:
            nonlocal pending
            if pending is not None:
                chunk, pending = pending.result(), None  # its error, if any, is raised here
                staged.new_chunks[chunk.id] = chunk

        # Counted while this object is sealed, disk waits included: a second thread only where
        # a CPU would otherwise idle (measured: also using it while the other object waited on
        # the disk made a batch no faster, and took ~10 MiB more).
        with _sealing_now() as spare_cpu:
            try:
                folder = StagingFolder(stage)
                refs: list[ChunkRef] = []
                fresh: set[str] = set()
                offset = 0
                for data in pieces(settle):
                    if stoppable is not None and self.stopping.is_set():
                        raise IngestStoppedError(f"{stoppable}: ingest interrupted by shutdown; "
                                                 "it stays at its source and is taken next start")
                    ref = self._chunk_ref(staged, data, offset)
                    refs.append(ref)
                    offset += len(data)
                    if ref.id in fresh or self.store.chunk_known(ref.id):
                        continue
                    fresh.add(ref.id)
                    if pending is not None and pending.done():
                        settle()
                    if (pending is None and spare_cpu()
                            and self.compressor.level <= SECOND_THREAD_MAX_LEVEL):
                        pending = _second_thread().submit(self._write_chunk, stage, ref.id,
                                                          data, sealing)
                    else:
                        chunk = self._write_chunk(stage, ref.id, data, sealing)
                        staged.new_chunks[chunk.id] = chunk
                settle()
                m = self._numbered(staged, manifest(tuple(refs)))
                staged.manifest_bytes, staged.manifest_hash = self._stage_manifest(stage, m)
                folder.sync([*staged.new_chunks, "manifest"])
                self.store.commit_object(staged)
            except BaseException as e:
                if pending is not None:
                    wait([pending])  # nothing may still write into the folder thrown away now
                self.store.abandon(staged.object_id)
                if is_disk_full(e):  # ENOSPC while staging: a refusal like a full quota
                    raise self.store.disk_full_error(e) from e
                raise
            finally:
                if folder is not None:
                    folder.close()
        return tuple(refs)

    def _numbered(self, staged: StagedObject, m: Manifest) -> Manifest:
        """Number the manifest (a seq allocated durably now: if the object never commits, the
        store records it void) and date it after that, so seq order is `created` order."""
        num = self.store.allocate_seq(staged.object_id, self.key_id)
        created = now_iso()
        staged.created = datetime.fromisoformat(created).timestamp()  # its cloud date folder
        return m.numbered(num.stream, num.seq, created)

    def _result(self, staged: StagedObject, refs: tuple[ChunkRef, ...],
                evicted: list[Eviction]) -> IngestResult:
        return IngestResult(
            staged.object_id, staged.size, len(refs), len(staged.new_chunks),
            sum(c.sealed_size for c in staged.new_chunks.values()) + staged.manifest_bytes,
            evicted=tuple(evicted),
        )

    def _stat_source(self, req: IngestRequest) -> os.stat_result:
        try:
            validate_name(req.name)
        except UnsafePathError as e:
            raise SourceError(f"{req.path}: {e}; such a name could never be restored — "
                              "rename the file") from None
        if req.seen is not None:
            st = req.seen
        else:
            try:
                st = os.stat(req.path, follow_symlinks=False)
            except FileNotFoundError:
                raise SourceError(f"{req.path} disappeared before it could be ingested") from None
            except OSError as e:
                raise SourceError(f"{req.path} could not be examined: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{req.path} is not a regular file; only regular files are ingested")
        return st

    def ingest_file(self, req: IngestRequest) -> IngestResult:
        """Seal one file into the store. Returns only after it is durable (accepted)."""
        st = self._stat_source(req)
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
                for data in self._file_pieces(f, st.st_size, settle):
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
            # its compression must stay cheap (level 19 took a core for a minute on 143 MiB,
            # and its context alone holds ~80 MiB).
            with self.compressor.capped(BATCH_MAX_LEVEL):
                refs = self._seal(staged, lambda _settle: self._memory_pieces(req.data),
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
        accepted: dict[str, IngestResult] = {}
        failed: dict[str, SourceError] = {}
        offered: list[tuple[IngestRequest, os.stat_result, str]] = []
        for req in reqs:
            try:
                st = self._stat_source(req)
            except SourceError as e:
                failed[req.name] = e
                continue
            offered.append((req, st, self.source_key(req.source, req.name, st.st_size,
                                                     st.st_mtime_ns)))
        known = self.store.accepted_source_keys([k for _, _, k in offered])
        members: list[tuple[IngestRequest, os.stat_result]] = []
        keys: dict[str, str] = {}
        for req, st, key in offered:
            previous = known.get(key)
            if previous is not None:
                accepted[req.name] = IngestResult(previous, st.st_size, 0, 0, 0,
                                                  duplicate_of=previous)
            elif req.name not in keys:
                keys[req.name] = key
                members.append((req, st))
        if len({(r.source, r.priority) for r, _ in members}) > 1:
            raise ValueError("a pack holds files of one source and one class")
        members.sort(key=lambda m: m[0].name)  # the same files give the same content and cuts
        while members:
            try:
                return self._seal_pack(members, keys, accepted, failed)
            except _MemberChanged as e:
                req = members.pop(e.index)[0]
                failed[req.name] = SourceError(f"{req.path} {e}; {NOT_STORED}")
        return PackResult(None, accepted, failed)

    def _seal_pack(self, members: list[tuple[IngestRequest, os.stat_result]],
                   keys: dict[str, str], accepted: dict[str, IngestResult],
                   failed: dict[str, SourceError]) -> PackResult:
        first = members[0][0]
        size = sum(st.st_size for _, st in members)
        reserved, evicted = self.store.reserve(size, first.priority, self.chunking.pack_max_size)
        staged = StagedObject(uuid7(), first.source, None, first.priority, size,
                              member_keys=[keys[r.name] for r, _ in members])
        reader = _PackReader(members)
        whole = blake3.blake3()

        def pieces(settle: Settle) -> Iterator[memoryview]:
            for data in self._pack_pieces(reader, size, settle):
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

    def _chunk_ref(self, staged: StagedObject, data: memoryview, offset: int) -> ChunkRef:
        digest = blake3.blake3(data, max_threads=1).digest()  # one pass for hash and id
        cid = crypto.chunk_id_of(self.keys.dedup_key, digest)
        staged.chunk_ids.append(cid)
        return ChunkRef(cid, offset, len(data), digest.hex())

    def _write_chunk(self, stage: Path, cid: str, data: memoryview,
                     sealing: crypto.SealingKey) -> StagedChunk:
        """Compress, encrypt and write one chunk into the staging folder (any thread)."""
        # Encrypted, hashed and written a piece at a time into one reusable buffer: beyond the
        # compressed payload, no copy of the chunk is held, and no large buffer is allocated
        # (and page-faulted in) per chunk.
        compression, payload = self.compressor.payload(data)
        sealer = crypto.Sealer(self.keys.recipient_public, kind=crypto.KIND_CHUNK,
                               compression=compression, plaintext_len=len(data), key=sealing)
        out = self._buffer(_PIECE + 64)
        sealed = blake3.blake3(sealer.header)
        size = len(sealer.header)
        with new_file(stage / cid) as write:
            # Each piece is written with what is still unwritten (the header) before the next
            # reuses `out`; the last, with the tag: one write for a chunk of one piece.
            unwritten: list[bytes | memoryview] = [sealer.header]
            pieces = iter(payload)
            piece = next(pieces, None)
            while piece is not None:
                n = sealer.update_into(piece, out)
                view = memoryview(out)[:n]
                sealed.update(view)
                size += n
                piece = next(pieces, None)
                unwritten.append(view)
                if piece is not None:
                    write(*unwritten)
                    unwritten = []
            tag = sealer.finalize()
            write(*unwritten, tag)
        sealed.update(tag)
        return StagedChunk(cid, size + len(tag), len(data), sealed.hexdigest())

    def _stage_manifest(self, stage: Path, manifest: Manifest) -> tuple[int, str]:
        body = crypto.sign_manifest(manifest.to_json(), self.keys.signing_key)
        compression, payload = self.compressor.compress(body)
        blob = crypto.seal(payload, self.keys.recipient_public, kind=crypto.KIND_MANIFEST,
                           compression=compression, plaintext_len=len(body))
        write_new(stage / "manifest", blob)
        return len(blob), crypto.content_hash(blob)
