"""The compression of sealed payloads (docs/FORMAT.md, "Compression"): what edge and cloud share.

The sealed header names the compression (`crypto.COMPRESSION_*`) and the plaintext length;
`decompress` is the one way back, and it never produces more than that length, whatever a
damaged or hostile frame declares. The edge's level policy (which level, when) lives in
agent/ingest/compressor.py.
"""

from __future__ import annotations

import zstandard

from agent.errors import FormatError
from agent.format.crypto import COMPRESSION_NONE, COMPRESSION_ZSTD

LDM_WINDOW_LOG = 24  # with long-distance matching, matches may reach across a whole 16 MiB chunk


def zstd_compressor(level: int, long_distance: bool = False) -> zstandard.ZstdCompressor:
    """A zstd context at `level`; with `long_distance`, matches span a whole chunk."""
    if long_distance:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, enable_ldm=True, window_log=LDM_WINDOW_LOG)
        return zstandard.ZstdCompressor(compression_params=params)
    return zstandard.ZstdCompressor(level=level)


def compress_small(data: bytes, level: int = 3) -> tuple[int, bytes]:
    """(compression id, payload) of a small object (a tip, a record): zstd unless that does not
    shrink it."""
    packed = zstd_compressor(level).compress(data)
    if len(packed) >= len(data):
        return COMPRESSION_NONE, data
    return COMPRESSION_ZSTD, packed


def decompress(compression: int, payload: bytes, plaintext_len: int) -> bytes | bytearray:
    """Undo compression into at most `plaintext_len` bytes, whatever the frame declares.

    The caller bounds `plaintext_len` (a signed chunk reference, a format maximum) before
    calling: this allocates it up front.
    """
    if compression == COMPRESSION_NONE:
        if len(payload) != plaintext_len:
            raise FormatError(f"payload is {len(payload)} bytes, header says {plaintext_len}")
        return payload
    if compression != COMPRESSION_ZSTD:
        raise FormatError(f"unknown compression {compression}")
    out = bytearray(plaintext_len)
    view, got = memoryview(out), 0
    more = b""
    try:
        with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
            while got < plaintext_len and (n := reader.readinto(view[got:])):
                got += n
            more = reader.read(1)
    except zstandard.ZstdError as e:
        raise FormatError(f"compressed payload is damaged: {e}") from None
    finally:
        view.release()
    if got != plaintext_len or more:
        raise FormatError(f"payload decompresses to {'more than ' if more else ''}{got} bytes, "
                          f"header says {plaintext_len}")
    return out
