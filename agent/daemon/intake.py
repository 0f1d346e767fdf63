"""The daemon's ingest entry points, as the sources call them: each seals off the event loop,
counts what was stored, refused or evicted, and wakes the uplink."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from agent.errors import DiskFullError, QuotaExceededError
from agent.host.blocking import RunBlocking
from agent.ingest.compression_policy import AutoLevel
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import BatchRequest, IngestRequest, IngestResult, PackResult
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.store.store import Eviction

A = TypeVar("A")
R = TypeVar("R")
log = logging.getLogger("skyferry.daemon")


class Intake:
    def __init__(self, pipeline: Pipeline, run_blocking: RunBlocking, metrics: Metrics,
                 wake_uplink: Callable[[], None], auto_level: AutoLevel | None) -> None:
        self.pipeline = pipeline
        self.run_blocking = run_blocking
        self.metrics = metrics
        self.wake_uplink = wake_uplink
        self.auto_level = auto_level  # `level = "auto"`: how busy ingest is informs the level

    async def ingest(self, req: IngestRequest) -> IngestResult:
        """One file (a spool's large file, `skyferry put`)."""
        result = await self._sealed(self.pipeline.ingest_file, req, req.priority)
        if result.duplicate_of is None:
            self._ingested(req.priority, result.evicted, result.size, 1, result.stored_bytes,
                           result.chunks, result.new_chunks)
        else:
            self.count_evictions(result.evicted)
        self.wake_uplink()
        return result

    async def ingest_pack(self, reqs: list[IngestRequest]) -> PackResult:
        """Like `ingest`, for small files sealed together (one pack)."""
        result = await self._sealed(self.pipeline.ingest_pack, reqs, reqs[0].priority)
        if result.object_id is None:
            self.count_evictions(result.evicted)
            return result
        fresh = sum(1 for r in result.accepted.values() if r.duplicate_of is None)
        self._ingested(reqs[0].priority, result.evicted, result.size, fresh,
                       result.stored_bytes, result.chunks, result.new_chunks)
        self.wake_uplink()
        return result

    async def ingest_batch(self, req: BatchRequest) -> IngestResult:
        """Like `ingest`, for an in-memory batch (MQTT)."""
        result = await self._sealed(self.pipeline.ingest_batch, req, req.priority)
        self._ingested(req.priority, result.evicted, result.size, 1, result.stored_bytes,
                       result.chunks, result.new_chunks)
        self.wake_uplink()
        return result

    def count_evictions(self, evicted: Iterable[Eviction]) -> None:
        for ev in evicted:
            self.metrics.evictions.labels(ev.priority, ev.reason).inc()
            log_event(log, logging.WARNING, "object_evicted",
                      f"dropped queued object ({ev.reason}) to stay within limits",
                      object=ev.object_id, bytes=ev.size, **{"class": ev.priority})

    def _sealing(self) -> contextlib.AbstractContextManager[None]:
        if self.auto_level is None:
            return contextlib.nullcontext()
        return self.auto_level.ingest.sealing()

    async def _sealed(self, fn: Callable[[A], R], arg: A, priority: str) -> R:
        """Run one pipeline ingest call off the loop; a refusal is counted, then re-raised."""
        try:
            with self._sealing():
                result: R = await self.run_blocking(fn, arg)
                return result
        except QuotaExceededError as e:
            self.metrics.refusals.labels(priority).inc()
            if isinstance(e, DiskFullError):  # the disk, not the quota: worth its own alert
                self.metrics.errors.labels("disk_full").inc()
            raise

    def _ingested(self, priority: str, evicted: tuple[Eviction, ...], size: int, items: int,
                  stored: int, chunks: int, new_chunks: int) -> None:
        """Metrics of one sealed object (`items`: files or batches it holds)."""
        self.count_evictions(evicted)
        self.metrics.ingested_bytes.labels(priority).inc(size)
        self.metrics.ingested_objects.labels(priority).inc(items)
        self.metrics.stored_bytes.labels(priority).inc(stored)
        self.metrics.dedup_chunks.inc(chunks - new_chunks)
