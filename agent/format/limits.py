"""The format's size limits (docs/FORMAT.md, "Limits"): what a reader may refuse unread.

The edge never writes beyond them; the cloud checks them before it fetches, allocates or
parses, so a hostile bucket cannot make a reader hold more than they allow.
"""

from __future__ import annotations

from agent.format.crypto import HEADER_SIZE, TAG_SIZE

# No edge cuts a larger chunk: config's `[chunking] max_size` ceiling (CDC_MAX_CEILING in
# agent/config/reader.py, which sits below this room) is the same number, a test checks it.
MAX_CHUNK_PLAINTEXT = 16 << 20
MAX_MANIFEST_PLAINTEXT = 16 << 20  # signature and JSON body of one manifest
# JSON objects ('{' bytes, a bound on chunk references plus pack entries) in one manifest body:
# about 100,000 honest chunk references fit in 16 MiB; tiny forged ones would cost far more
# memory as Python objects than as bytes.
MAX_MANIFEST_OBJECTS = 1 << 17


def sealed_max(plaintext_len: int) -> int:
    """The largest sealed object a plaintext of this length can give (zstd's worst case)."""
    small = (128 << 10) - plaintext_len >> 11 if plaintext_len < 128 << 10 else 0
    return HEADER_SIZE + TAG_SIZE + plaintext_len + (plaintext_len >> 8) + small + 64


MAX_SEALED_MANIFEST = sealed_max(MAX_MANIFEST_PLAINTEXT)
