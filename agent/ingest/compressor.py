"""The edge's zstd: which level a chunk is compressed at, and whether it is compressed at all.

The codec itself (what the sealed header's compression id means, and the bounded way back) is
agent/format/codec.py, shared with the cloud.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import zstandard

from agent.config.settings import CompressionSettings
from agent.format import crypto
from agent.format.codec import zstd_compressor

PIECE = 1 << 20  # a chunk is compressed, sealed and written this much at a time
FAST_LEVEL = 1  # whether data compresses at all shows at the fastest level


def _slices(data: memoryview, size: int) -> Iterator[memoryview]:
    for at in range(0, len(data), size):
        yield data[at:at + size]


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
            c = cache[key] = zstd_compressor(*key)
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
        """A chunk's (compression id, payload in pieces of at most PIECE bytes).

        Compressed in one call (zstd's fastest path: no copy into its window, no wrapped
        window); a chunk is at most 16 MiB (`[chunking] max_size`), so is its payload.
        """
        compression, packed = self.compress(data)
        return compression, _slices(memoryview(packed), PIECE)
