"""What the uplink writes into the store: work acknowledged by the cloud, work put back in line,
and files found damaged. Writes that record an acknowledgement finish even when the worker that
made them is cancelled, and shutdown waits for them (`drain`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from agent.errors import CorruptChunkError, DiskFullError
from agent.host.blocking import RunBlocking
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.store.store import ChunkWork, ManifestWork, Store, Work
from agent.uplink.trouble import INDEX_FULL_PAUSE_S, Trouble

log = logging.getLogger("skyferry.uplink")


class Ledger:
    """`committed` is set each time an object completes in the cloud (a tip may be due)."""

    def __init__(self, store: Store, run_blocking: RunBlocking, metrics: Metrics,
                 trouble: Trouble, committed: asyncio.Event) -> None:
        self.store = store
        self.run_blocking = run_blocking
        self.metrics = metrics
        self.trouble = trouble
        self.committed = committed
        self._acks: set[asyncio.Task[None]] = set()

    async def shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run bookkeeping that must finish even when the worker is cancelled."""
        task = asyncio.ensure_future(coro)
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)
        await asyncio.shield(task)

    async def drain(self) -> None:
        """At shutdown: let acknowledged uploads reach the index before the store closes."""
        if self._acks:
            await asyncio.gather(*self._acks, return_exceptions=True)

    def release(self, work: Work) -> None:
        """Put `work` back in line (blocking)."""
        if isinstance(work, ChunkWork):
            self.store.release_chunk(work.chunk_id)
        else:
            self.store.release_manifest(work.object_id)

    async def release_when_recorded(self, work: Work, e: DiskFullError) -> None:
        """The index could not record what the cloud acknowledged: the work goes back in
        line (sending it again is harmless: put_if_absent finds the cloud copy)."""
        self.trouble.index_full(e)
        while True:
            try:
                await self.run_blocking(self.release, work)
                return
            except DiskFullError:
                await asyncio.sleep(INDEX_FULL_PAUSE_S)

    async def corrupt(self, work: Work, e: CorruptChunkError) -> None:
        """A local file is damaged: the objects that need it are marked damaged."""
        if isinstance(work, ManifestWork):
            await self.run_blocking(self.store.mark_manifest_corrupt, work.object_id)
            self.metrics.errors.labels("corrupt_manifest").inc()
            log_event(log, logging.ERROR, "manifest_corrupt",
                      f"{e}; object {work.object_id} marked damaged and not sent; "
                      "re-ingest it from its source", object=work.object_id)
            return
        objects = await self.run_blocking(self.store.mark_chunk_corrupt, work.chunk_id)
        if not objects:
            # No queued object needs it any more: its file was released while this worker
            # had it in flight (another chunk of its object was found damaged). Nothing is
            # lost here, so it is no second error.
            log_event(log, logging.DEBUG, "chunk_released",
                      f"{e}; no queued object needs it", chunk=work.chunk_id)
            return
        self.metrics.errors.labels("corrupt_chunk").inc()
        log_event(log, logging.ERROR, "chunk_corrupt",
                  f"{e}; objects {', '.join(objects) or '(none)'} marked damaged; "
                  "re-ingest them from their source", chunk=work.chunk_id)

    async def chunk_acknowledged(self, work: ChunkWork, nbytes: int, written: bool) -> None:
        await self.shielded(self._chunk_acknowledged(work, nbytes, written))

    async def _chunk_acknowledged(self, work: ChunkWork, nbytes: int, written: bool) -> None:
        await self.run_blocking(self.store.mark_chunk_uploaded, work.chunk_id)
        if written:
            self.metrics.sent_bytes.labels("chunk").inc(nbytes)
        log_event(log, logging.DEBUG, "chunk_sent", "chunk acknowledged", chunk=work.chunk_id,
                  object=work.object_id, bytes=nbytes, sent=written)

    async def manifest_acknowledged(self, work: ManifestWork, nbytes: int) -> None:
        await self.shielded(self._manifest_acknowledged(work, nbytes))

    async def _manifest_acknowledged(self, work: ManifestWork, nbytes: int) -> None:
        await self.run_blocking(self.store.mark_committed, work.object_id)
        self.metrics.sent_bytes.labels("manifest").inc(nbytes)
        self.metrics.committed_objects.labels(work.priority).inc()
        self.committed.set()
        log_event(log, logging.INFO, "object_committed", "object complete in the cloud",
                  object=work.object_id, **{"class": work.priority})
