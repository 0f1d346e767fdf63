"""Sealing chunks: compress, encrypt and write each into the staging folder, on this thread or,
while a CPU would otherwise idle, on the process's one sealing thread.

Everything here blocks (compression, encryption, fsync): call it through the executor.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, wait
from contextlib import contextmanager
from pathlib import Path

import blake3

from agent.format import crypto
from agent.format.crypto import EdgeKeys
from agent.format.manifest import ChunkRef, Manifest
from agent.ingest.compressor import Compressor
from agent.store.fsio import new_file, write_new
from agent.store.store import StagedChunk, StagedObject

# The sealing thread holds a zstd context of its own: ~1-3 MiB up to level 3, but ~50-80 MiB
# at level 19, where the link, not ingest, is the bottleneck anyway.
SECOND_THREAD_MAX_LEVEL = 3
BATCH_MAX_LEVEL = 9  # in-memory batches (MQTT): ~40 MB/s a core, a ~10 MiB context

_CPUS = len(os.sched_getaffinity(0))
_computing = 0  # objects of this process being sealed now, from cutting to commit
_computing_lock = threading.Lock()

WriteChunk = Callable[[Path, str, memoryview, crypto.SealingKey], StagedChunk]


@contextmanager
def sealing_now() -> Iterator[Callable[[], bool]]:
    """Count an object as being sealed; yields "is a CPU spare for it?".

    Counted from cutting to commit, disk waits included: a second thread is used only where a
    CPU would otherwise idle (using it while the other object waits on the disk makes a batch
    no faster, and costs ~10 MiB more).
    """
    global _computing
    with _computing_lock:
        _computing += 1
    try:
        yield lambda: _computing < _CPUS
    finally:
        with _computing_lock:
            _computing -= 1


class ChunkWriters:
    """The chunks of one object, each written by this thread or, one at a time, by the
    sealing thread while this one cuts and seals the next."""

    def __init__(self, write: WriteChunk, done: dict[str, StagedChunk],
                 may_hand_off: Callable[[], bool], hand_off: Executor | None) -> None:
        self._write = write
        self._done = done
        self._may_hand_off = may_hand_off
        self._hand_off = hand_off  # the sealing thread, given by whoever owns the threads
        self._pending: Future[StagedChunk] | None = None

    def settle(self) -> None:
        """Wait for the chunk the sealing thread works on; its error, if any, is raised here."""
        if self._pending is not None:
            chunk, self._pending = self._pending.result(), None
            self._done[chunk.id] = chunk

    def write(self, stage: Path, cid: str, data: memoryview, key: crypto.SealingKey) -> None:
        if self._pending is not None and self._pending.done():
            self.settle()
        if self._hand_off is not None and self._pending is None and self._may_hand_off():
            self._pending = self._hand_off.submit(self._write, stage, cid, data, key)
        else:
            chunk = self._write(stage, cid, data, key)
            self._done[chunk.id] = chunk

    def abandon(self) -> None:
        """Before the staging folder is thrown away: nothing may still write into it."""
        if self._pending is not None:
            wait([self._pending])


def chunk_ref(keys: EdgeKeys, staged: StagedObject, data: memoryview, offset: int) -> ChunkRef:
    digest = blake3.blake3(data, max_threads=1).digest()  # one pass for hash and id
    cid = crypto.chunk_id_of(keys.dedup_key, digest)
    staged.chunk_ids.append(cid)
    return ChunkRef(cid, offset, len(data), digest.hex())


def write_chunk(stage: Path, cid: str, data: memoryview, sealing: crypto.SealingKey,
                keys: EdgeKeys, compressor: Compressor, out: bytearray) -> StagedChunk:
    """Compress, encrypt and write one chunk into the staging folder (any thread).

    Encrypted, hashed and written a piece at a time into `out` (PIECE + 64 bytes, reused):
    beyond the compressed payload, no copy of the chunk is held, and no large buffer is
    allocated (and page-faulted in) per chunk.
    """
    compression, payload = compressor.payload(data)
    sealer = crypto.Sealer(keys.recipient_public, kind=crypto.KIND_CHUNK,
                           compression=compression, plaintext_len=len(data), key=sealing)
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


def stage_manifest(stage: Path, manifest: Manifest, keys: EdgeKeys,
                   compressor: Compressor) -> tuple[int, str]:
    """Sign, compress, seal and write the manifest; its (sealed size, content hash)."""
    body = crypto.sign_manifest(manifest.to_json(), keys.signing_key)
    compression, payload = compressor.compress(body)
    blob = crypto.seal(payload, keys.recipient_public, kind=crypto.KIND_MANIFEST,
                       compression=compression, plaintext_len=len(body))
    write_new(stage / "manifest", blob)
    return len(blob), crypto.content_hash(blob)
