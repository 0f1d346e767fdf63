"""Content-defined chunking (FastCDC) of a stream or an in-memory object.

Everything here blocks: call it through the executor, never on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from pyfastcdc import FastCDC

from agent.config.settings import ChunkingSettings

# Called by a cutter just before it reuses the buffer the pieces it gave point into.
Settle = Callable[[], None]


class Readable(Protocol):
    def readinto(self, view: memoryview, /) -> int | None: ...


class BufferPool:
    """Large reusable buffers, shared by the threads that ingest: one is leased for a whole
    object, so the buffers that exist are as many as objects were ever sealed at once (two per
    spool), not one per thread that ever ingested (the daemon has four I/O threads).

    pyfastcdc's cut_stream zero-fills a fresh one per file, which cost ~35 ms a file; mmap
    (cut_file) would SIGBUS on a truncated file; and sealing writes each chunk through one.
    """

    KEEP_BYTES = 48 << 20  # free buffers kept per size; beyond, they are let go

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def lease(self, size: int) -> Iterator[Callable[[], bytearray]]:
        """Yields a getter: the buffer is taken at its first call (an object that needs none,
        such as a file below the minimum chunk size, takes none) and given back at the end."""
        got: list[bytearray] = []

        def get() -> bytearray:
            if not got:
                with self._lock:
                    free = self._free.get(size)
                    buf = free.pop() if free else None
                got.append(buf if buf is not None else bytearray(size))
            return got[0]

        try:
            yield get
        finally:
            if got:
                with self._lock:
                    free = self._free.setdefault(size, [])
                    if (len(free) + 1) * size <= self.KEEP_BYTES:
                        free.append(got[0])


class Cutter:
    """The pieces a file, a pack's stream or an in-memory object is cut into."""

    def __init__(self, chunking: ChunkingSettings) -> None:
        self.chunking = chunking

    # Cuts do not depend on the buffer's size as long as it exceeds max_size (each pass
    # restarts at a cut): max + avg rather than 2 max keeps 12 MiB less resident per object
    # being cut, and a pass still yields a few chunks on average.
    @property
    def file_buffer(self) -> int:
        return self.chunking.max_size + self.chunking.avg_size

    @property
    def pack_buffer(self) -> int:
        return self.chunking.pack_max_size + self.chunking.pack_avg_size

    def file_pieces(self, f: Readable, size: int, settle: Settle,
                    buffer: Callable[[], bytearray]) -> Iterator[memoryview]:
        """`buffer()`: a buffer of `file_buffer` bytes, which the caller holds until the
        pieces are settled (sealed)."""
        c = self.chunking
        return self._cut(f, size, c.min_size, c.avg_size, c.max_size, settle, buffer)

    def pack_pieces(self, f: Readable, size: int, settle: Settle,
                    buffer: Callable[[], bytearray]) -> Iterator[memoryview]:
        """Like `file_pieces`; `buffer()` gives `pack_buffer` bytes."""
        c = self.chunking
        return self._cut(f, size, c.pack_min_size, c.pack_avg_size, c.pack_max_size, settle,
                         buffer)

    def memory_pieces(self, data: bytes) -> Iterator[memoryview]:
        """Content-defined pieces of an in-memory object: views into it, the same cuts as
        `file_pieces` (no copy into a cut buffer: up to 20 MiB less per batch)."""
        c = self.chunking
        view = memoryview(data)
        if len(view) <= c.min_size:
            if view:
                yield view
            return
        cutter = FastCDC(c.avg_size - c.min_size, min_size=c.min_size, max_size=c.max_size)
        for piece in cutter.cut_buf(view):
            yield view[piece.offset:piece.offset + piece.length]

    def _cut(self, f: Readable, size: int, low: int, avg: int, high: int,
             settle: Settle, buffer: Callable[[], bytearray]) -> Iterator[memoryview]:
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
        buf = buffer()
        assert len(buf) > high
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
