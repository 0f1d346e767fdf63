"""Chunk, hash, compress, seal and stage an object, then commit it to the store.

Everything here blocks (hashing, compression, encryption, fsync): call it through the
executor, never on the event loop.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import blake3
import zstandard
from pyfastcdc import FastCDC

from agent import crypto
from agent.crypto import EdgeKeys
from agent.errors import FormatError, IngestStoppedError, SourceError, UnsafePathError
from agent.fsio import write_durable
from agent.manifest import (
    KIND_FILE,
    KIND_MQTT_BATCH,
    ChunkRef,
    Manifest,
    check_name,
    now_iso,
    uuid7,
)
from agent.settings import ChunkingSettings, CompressionSettings
from agent.store import Eviction, StagedChunk, StagedObject, Store

_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class IngestRequest:
    path: Path
    source: str
    name: str  # relative POSIX name kept in the manifest
    priority: str
    meta: dict[str, str] = field(default_factory=dict)


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


class Compressor:
    """zstd with a cheap sample test, so incompressible data is not compressed in vain."""

    def __init__(self, settings: CompressionSettings) -> None:
        self.settings = settings
        self._local = threading.local()

    def _zstd(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = zstandard.ZstdCompressor(level=self.settings.level)
            self._local.c = c
        return c

    def compress(self, data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
        """Return (compression id, payload); an uncompressed payload is a view of `data`."""
        # No bytes(data) copy (up to 16 MiB per ingest thread): seal() reads the view before
        # the caller's buffer moves on.
        sample = data[: self.settings.sample_size]
        z = self._zstd()
        if len(sample) >= 512 and len(z.compress(sample)) > len(sample) * self.settings.min_ratio:
            return crypto.COMPRESSION_NONE, memoryview(data)
        packed = z.compress(data)
        if len(packed) >= len(data):
            return crypto.COMPRESSION_NONE, memoryview(data)
        return crypto.COMPRESSION_ZSTD, packed


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


def _read_all(f: BinaryIO) -> bytes:
    parts = []
    while block := f.read(_READ_BLOCK):
        parts.append(block)
    return b"".join(parts)


class Pipeline:
    def __init__(self, site: str, keys: EdgeKeys, store: Store, chunking: ChunkingSettings,
                 compression: CompressionSettings) -> None:
        self.site = site
        self.keys = keys
        self.store = store
        self.chunking = chunking
        self.compressor = Compressor(compression)
        self._local = threading.local()
        # Set at shutdown: a file being read is abandoned at the next chunk (it stays at its
        # source), so SIGTERM is not held up by a 50 GB ingest.
        self.stopping = threading.Event()

    def source_key(self, source: str, name: str, size: int, mtime_ns: int) -> str:
        """Identity of one version of a source item, keyed so it reveals nothing."""
        ident = f"{source}\0{name}\0{size}\0{mtime_ns}".encode()
        return crypto.chunk_id(self.keys.dedup_key, ident)

    def _cutter(self) -> FastCDC:
        c = self.chunking
        # pyfastcdc's average excludes the minimum (cut-point skipping), hence avg - min.
        return FastCDC(c.avg_size - c.min_size, min_size=c.min_size, max_size=c.max_size)

    def _buffer(self) -> bytearray:
        # One reusable buffer per thread: pyfastcdc's cut_stream zero-fills a fresh one per
        # file, which cost ~35 ms a file; mmap (cut_file) would SIGBUS on a truncated file.
        buf: bytearray | None = getattr(self._local, "buf", None)
        # Cuts do not depend on the size as long as it exceeds max_size (each pass restarts
        # at a cut); max + 2 avg instead of 2 max saved 16 MiB of peak RSS at the same speed.
        want = self.chunking.max_size + 2 * self.chunking.avg_size
        if buf is None or len(buf) != want:
            buf = bytearray(want)
            self._local.buf = buf
        return buf

    def _pieces(self, path: Path, size: int) -> Iterator[memoryview]:
        """Content-defined pieces of the file; each view is valid until the next is yielded."""
        if size == 0:
            return
        with open(path, "rb", buffering=0) as f:
            if size <= self.chunking.min_size:  # FastCDC never cuts below min_size
                yield memoryview(_read_all(f))
                return
            buf = self._buffer()
            view = memoryview(buf)
            cutter = self._cutter()
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
                tail = filled - start
                buf[:tail] = buf[start:filled]
                filled = tail

    def ingest_file(self, req: IngestRequest) -> IngestResult:
        """Seal one file into the store. Returns only after it is durable (accepted)."""
        try:
            check_name(req.name)
        except UnsafePathError as e:
            raise SourceError(f"{req.path}: {e}; such a name could never be restored — "
                              "rename the file") from None
        try:
            st = os.stat(req.path, follow_symlinks=False)
        except FileNotFoundError:
            raise SourceError(f"{req.path} disappeared before it could be ingested") from None
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{req.path} is not a regular file; only regular files are ingested")
        key = self.source_key(req.source, req.name, st.st_size, st.st_mtime_ns)
        previous = self.store.accepted_source_key(key)
        if previous is not None:
            return IngestResult(previous, st.st_size, 0, 0, 0, duplicate_of=previous)
        reserved, evicted = self.store.reserve(st.st_size, req.priority, self.chunking.max_size)
        object_id = uuid7()
        stage = self.store.staging_path(object_id)
        try:
            stage.mkdir()
            staged = StagedObject(object_id, req.source, key, req.priority, st.st_size)
            refs: list[ChunkRef] = []
            whole = blake3.blake3()
            offset = 0
            for data in self._pieces(req.path, st.st_size):
                if self.stopping.is_set():
                    raise IngestStoppedError(f"{req.path}: ingest interrupted by shutdown; the "
                                             "file stays at its source and is taken next start")
                ref = self._stage_chunk(staged, stage, data, offset)
                whole.update(data)
                refs.append(ref)
                offset += len(data)
            after = os.stat(req.path, follow_symlinks=False)
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or (
                offset != st.st_size
            ):
                raise SourceError(
                    f"{req.path} changed while it was being read; it will be ingested again "
                    "once it stops changing"
                )
            manifest = Manifest(
                object_id=object_id, site=self.site, source=req.source, kind=KIND_FILE,
                name=req.name, size=st.st_size, mtime_ns=st.st_mtime_ns,
                hash=whole.hexdigest(), priority=req.priority, created=now_iso(),
                chunks=tuple(refs), meta=dict(req.meta),
            )
            staged.manifest_bytes, staged.manifest_hash = self._stage_manifest(stage, manifest)
            self.store.commit_object(staged)
        except BaseException:
            self.store.abandon(object_id)
            raise
        finally:
            self.store.release(reserved)
        return IngestResult(
            object_id, st.st_size, len(refs), len(staged.new_chunks),
            sum(c.sealed_size for c in staged.new_chunks.values()) + staged.manifest_bytes,
            evicted=tuple(evicted),
        )

    def ingest_batch(self, req: BatchRequest) -> IngestResult:
        """Seal an in-memory object into the store. Returns only after it is durable."""
        size = len(req.data)
        reserved, evicted = self.store.reserve(size, req.priority, self.chunking.max_size)
        object_id = uuid7()
        name = f"{req.name_prefix}{object_id}{req.name_suffix}"
        check_name(name)
        stage = self.store.staging_path(object_id)
        try:
            stage.mkdir()
            staged = StagedObject(object_id, req.source, None, req.priority, size)
            refs: list[ChunkRef] = []
            offset = 0
            for data in self._pieces_of(req.data):
                refs.append(self._stage_chunk(staged, stage, data, offset))
                offset += len(data)
            manifest = Manifest(
                object_id=object_id, site=self.site, source=req.source, kind=req.kind,
                name=name, size=size, mtime_ns=req.mtime_ns,
                hash=crypto.content_hash(req.data), priority=req.priority, created=now_iso(),
                chunks=tuple(refs), meta=dict(req.meta),
            )
            staged.manifest_bytes, staged.manifest_hash = self._stage_manifest(stage, manifest)
            self.store.commit_object(staged)
        except BaseException:
            self.store.abandon(object_id)
            raise
        finally:
            self.store.release(reserved)
        return IngestResult(
            object_id, size, len(refs), len(staged.new_chunks),
            sum(c.sealed_size for c in staged.new_chunks.values()) + staged.manifest_bytes,
            evicted=tuple(evicted),
        )

    def _pieces_of(self, data: bytes) -> Iterator[memoryview]:
        """Content-defined pieces of an in-memory object (one piece when it is small)."""
        view = memoryview(data)
        if len(data) <= self.chunking.min_size:
            if data:
                yield view
            return
        for piece in self._cutter().cut_buf(view):
            yield view[piece.offset:piece.offset + piece.length]

    def _stage_chunk(self, staged: StagedObject, stage: Path, data: memoryview,
                     offset: int) -> ChunkRef:
        cid = crypto.chunk_id(self.keys.dedup_key, data)
        ref = ChunkRef(cid, offset, len(data), crypto.content_hash(data))
        staged.chunk_ids.append(cid)
        if cid in staged.new_chunks or self.store.chunk_known(cid):
            return ref
        compression, payload = self.compressor.compress(data)
        # Header and ciphertext are written (and hashed) as two parts: joining them would copy
        # up to 16 MiB per ingest thread, at the pipeline's peak RSS.
        header, body = crypto.seal_parts(payload, self.keys.recipient_public,
                                         kind=crypto.KIND_CHUNK, compression=compression,
                                         plaintext_len=len(data))
        del payload
        write_durable(stage / cid, header, body, sync_dir=False)
        staged.new_chunks[cid] = StagedChunk(cid, len(header) + len(body), len(data),
                                             crypto.content_hash(header, body))
        return ref

    def _stage_manifest(self, stage: Path, manifest: Manifest) -> tuple[int, str]:
        body = crypto.sign_manifest(manifest.to_json(), self.keys.signing_key)
        compression, payload = self.compressor.compress(body)
        blob = crypto.seal(payload, self.keys.recipient_public, kind=crypto.KIND_MANIFEST,
                           compression=compression, plaintext_len=len(body))
        write_durable(stage / "manifest", blob, sync_dir=False)
        return len(blob), crypto.content_hash(blob)
