"""Workers that move sealed chunks, then manifests, to the backend while the gate is open."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import blake3
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from agent import layout
from agent.backends import Backend
from agent.errors import BackendError, CorruptChunkError, PermanentBackendError
from agent.gate import Clock, Gate
from agent.ratelimit import TokenBucket
from agent.settings import UplinkSettings
from agent.store import ChunkWork, ManifestWork, Store, Work
from agent.telemetry.logs import log_event
from agent.telemetry.metrics import Metrics

T = TypeVar("T")
RunBlocking = Callable[..., Awaitable[Any]]
log = logging.getLogger("skyferry.uplink")


def _transient(e: BaseException) -> bool:
    return isinstance(e, BackendError) and not isinstance(e, PermanentBackendError)


def read_verified(path: Path, size: int, sealed_hash: str, chunk_id: str) -> bytes:
    """Read a sealed chunk file and check it against the index before it leaves the site."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptChunkError(f"chunk file {path} is missing (chunk {chunk_id})") from None
    if len(data) != size:
        raise CorruptChunkError(
            f"chunk file {path} is {len(data)} bytes, the index recorded {size}: truncated or "
            f"overwritten (chunk {chunk_id})")
    if blake3.blake3(data).hexdigest() != sealed_hash:
        raise CorruptChunkError(
            f"chunk file {path} does not match its recorded hash: damaged on disk "
            f"(chunk {chunk_id})")
    return data


class Uplink:
    def __init__(self, site: str, store: Store, backend: Backend, gate: Gate,
                 settings: UplinkSettings, run_blocking: RunBlocking, metrics: Metrics,
                 clock: Clock) -> None:
        self.site = site
        self.store = store
        self.backend = backend
        self.gate = gate
        self.settings = settings
        self.run_blocking = run_blocking
        self.metrics = metrics
        self.clock = clock
        self._wake = asyncio.Event()
        self.in_flight: set[str] = set()
        self.limiter = TokenBucket(settings.rate_bps)
        self._acks: set[asyncio.Task[None]] = set()

    async def _shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run bookkeeping that must finish even when the worker is cancelled."""
        task = asyncio.ensure_future(coro)
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)
        await asyncio.shield(task)

    async def drain_acks(self) -> None:
        """At shutdown: let acknowledged uploads reach the index before the store closes."""
        if self._acks:
            await asyncio.gather(*self._acks, return_exceptions=True)

    def notify(self) -> None:
        """New work was queued: wake idle workers."""
        self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(self.settings.streams):
                tg.create_task(self._worker(i), name=f"uplink-{i}")

    async def _worker(self, index: int) -> None:
        while True:
            await self.gate.wait_open()
            work: Work | None = await self.run_blocking(
                self.store.next_work, self.clock(), self.settings.aging_s)
            if work is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            try:
                ok = await self._until_gate_closes(work)
            except asyncio.CancelledError:
                self._release(work)
                raise
            if not ok:
                await asyncio.sleep(self.settings.retry_initial_s)

    async def _until_gate_closes(self, work: Work) -> bool:
        """Run one upload; a closing gate (loss of signal, window end) cancels it."""
        upload = asyncio.create_task(self._do(work))
        closed = asyncio.create_task(self.gate.wait_closed())
        try:
            done, _ = await asyncio.wait({upload, closed}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            upload.cancel()
            raise
        finally:
            closed.cancel()
        if upload in done:
            return upload.result()
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upload
        if isinstance(work, ChunkWork):
            self.metrics.resent_bytes.inc(work.sealed_size)
        self._release(work)
        log_event(log, logging.INFO, "upload_cut", "gate closed during upload; will re-send",
                  chunk=getattr(work, "chunk_id", None), object=work.object_id)
        return True

    def _release(self, work: Work) -> None:
        if isinstance(work, ChunkWork):
            self.store.release_chunk(work.chunk_id)
        else:
            self.store.release_manifest(work.object_id)

    async def _do(self, work: Work) -> bool:
        """Upload one unit; False when it failed and went back in line."""
        try:
            if isinstance(work, ChunkWork):
                await self._send_chunk(work)
            else:
                await self._send_manifest(work)
            return True
        except CorruptChunkError as e:
            assert isinstance(work, ChunkWork)
            objects = await self.run_blocking(self.store.mark_chunk_corrupt, work.chunk_id)
            self.metrics.errors.labels("corrupt_chunk").inc()
            log_event(log, logging.ERROR, "chunk_corrupt",
                      f"{e}; objects {', '.join(objects) or '(none)'} marked damaged; "
                      "re-ingest them from their source", chunk=work.chunk_id)
            return True
        except BackendError as e:
            self.metrics.errors.labels(
                "backend_permanent" if isinstance(e, PermanentBackendError) else "backend"
            ).inc()
            log_event(log, logging.WARNING, "upload_failed", str(e), object=work.object_id)
            await self.run_blocking(self._release, work)
            if isinstance(e, PermanentBackendError):
                await asyncio.sleep(self.settings.retry_max_s)
            return False

    async def _with_retries(self, fn: Callable[[], Awaitable[T]]) -> T:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential_jitter(self.settings.retry_initial_s, self.settings.retry_max_s),
            stop=stop_after_attempt(5),
            reraise=True,
        ):
            with attempt:
                return await fn()
        raise AssertionError("unreachable")

    async def _send_chunk(self, work: ChunkWork) -> None:
        data: bytes = await self.run_blocking(
            read_verified, work.path, work.sealed_size, work.sealed_hash, work.chunk_id)
        key = layout.chunk_key(self.site, work.chunk_id)
        await self.limiter.acquire(len(data))
        self.in_flight.add(work.chunk_id)
        try:
            written = await self._with_retries(lambda: self.backend.put_if_absent(key, data))
        finally:
            self.in_flight.discard(work.chunk_id)
        # Shielded: once the cloud has acknowledged, the index and the log must say so even
        # if shutdown cancels this worker right now.
        await self._shielded(self._chunk_acknowledged(work, len(data), written))

    async def _chunk_acknowledged(self, work: ChunkWork, nbytes: int, written: bool) -> None:
        await self.run_blocking(self.store.mark_chunk_uploaded, work.chunk_id)
        if written:
            self.metrics.sent_bytes.labels("chunk").inc(nbytes)
        log_event(log, logging.DEBUG, "chunk_sent", "chunk acknowledged", chunk=work.chunk_id,
                  object=work.object_id, bytes=nbytes, sent=written)

    async def _send_manifest(self, work: ManifestWork) -> None:
        data: bytes = await self.run_blocking(work.path.read_bytes)
        key = layout.manifest_key(self.site, work.created, work.object_id)
        await self._with_retries(lambda: self.backend.put_if_absent(key, data))
        await self._shielded(self._manifest_acknowledged(work, len(data)))

    async def _manifest_acknowledged(self, work: ManifestWork, nbytes: int) -> None:
        await self.run_blocking(self.store.mark_committed, work.object_id)
        self.metrics.sent_bytes.labels("manifest").inc(nbytes)
        self.metrics.committed_objects.labels(work.priority).inc()
        log_event(log, logging.INFO, "object_committed", "object complete in the cloud",
                  object=work.object_id, **{"class": work.priority})
