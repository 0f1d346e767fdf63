"""Reading sealed objects on the cloud side within fixed bounds (docs/FORMAT.md, "Limits").

Whatever a bucket holds, an object is never read when its size exceeds what the format allows
for it, a plaintext is never allocated beyond the format's maximum, and the bytes restore
holds at once are counted against a budget. Also the few task helpers restore runs its work
with (bounded workers; threads that finish before their caller unwinds).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import CryptoError, FormatError
from agent.format import crypto
from agent.format.codec import decompress
from agent.format.limits import MAX_MANIFEST_OBJECTS, MAX_MANIFEST_PLAINTEXT
from agent.format.manifest import ChunkRef

# Bytes of memory one manifest may cost per byte of its plaintext while it is checked and
# parsed (measured: ~7 for a body of chunk references at the peak, ~5 once parsed).
MANIFEST_COST_FACTOR = 8
# With the interpreter and libraries (~45 MiB), all budgets full stay under 256 MiB of RSS.
CHUNK_BUDGET = 64 << 20  # chunk bytes (sealed, opened, decompressed) held at once
MANIFEST_BUDGET = 112 << 20  # parsed manifests held at once (one at the maximum size)
SEALED_MANIFEST_BUDGET = 20 << 20  # sealed manifests fetched and not yet parsed
T = TypeVar("T")


def chunk_cost(length: int) -> int:
    """Memory one chunk in flight may hold: the sealed bytes, the payload, the plaintext."""
    return 3 * length + 4096


def manifest_cost(plaintext_len: int) -> int:
    return min(MANIFEST_BUDGET, MANIFEST_COST_FACTOR * plaintext_len + 4096)


class Budget:
    """Bytes that may be held at once; a request for more than the whole waits to be alone."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self, n: int) -> int | None:
        n = min(n, self.total)
        if self.used + n > self.total:
            return None
        self.used += n
        return n

    async def take(self, n: int) -> int:
        while (got := self.try_take(n)) is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        return got

    def give(self, n: int) -> None:
        self.used -= n
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)


def open_chunk(blob: bytes | memoryview, recipient: X25519PrivateKey,
               ref: ChunkRef) -> bytes | bytearray:
    """A chunk's plaintext, its header checked against the signed reference before anything
    is decrypted or allocated."""
    header = crypto.parse_header(blob)
    if header.kind != crypto.KIND_CHUNK or header.plaintext_len != ref.length:
        raise FormatError(f"header (kind {header.kind}, {header.plaintext_len} bytes) does not "
                          f"match the manifest's chunk of {ref.length} bytes")
    _, payload = crypto.open_sealed(blob, recipient)
    data = decompress(header.compression, payload, header.plaintext_len)
    if crypto.content_hash(data) != ref.hash:
        raise CryptoError("does not match the manifest's hash")
    return data


def open_manifest(blob: bytes, recipient: X25519PrivateKey) -> bytes | bytearray:
    """A manifest's signed plaintext, refused before decryption if it exceeds the cap."""
    header = crypto.parse_header(blob)
    if header.kind != crypto.KIND_MANIFEST:
        raise FormatError("holds a chunk, not a manifest")
    if header.plaintext_len > MAX_MANIFEST_PLAINTEXT:
        raise FormatError(f"claims a {header.plaintext_len}-byte manifest, more than the "
                          f"format's maximum of {MAX_MANIFEST_PLAINTEXT}")
    _, payload = crypto.open_sealed(blob, recipient)
    return decompress(header.compression, payload, header.plaintext_len)


def check_manifest_body(body: bytes) -> None:
    """Refuse, before parsing, a body whose JSON would cost more memory than the format allows."""
    objects = body.count(b"{")
    if objects > MAX_MANIFEST_OBJECTS:
        raise FormatError(f"manifest holds {objects} JSON objects (chunk references and pack "
                          f"entries), more than the format's maximum of {MAX_MANIFEST_OBJECTS}")


async def settled(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) in a thread; when cancelled, return only once the thread is done with it.

    The thread writes to descriptors that the caller closes (and the kernel may hand out
    again) when it unwinds: it must not unwind while the thread still uses them.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(fut)
        raise


async def workers(limit: int, items: Iterable[T], fn: Callable[[T], Awaitable[None]]) -> None:
    """Run fn on every item, `limit` at a time, without a task (or coroutine) per item."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await fn(item)

    async with asyncio.TaskGroup() as tg:
        for _ in range(limit):
            tg.create_task(worker())
