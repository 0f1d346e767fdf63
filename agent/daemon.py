"""Wiring only: build the parts from settings, run them in one TaskGroup, stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from prometheus_client import start_http_server

from agent.backends import open_backend
from agent.crypto import load_edge_keys
from agent.errors import QuotaExceededError
from agent.gate import Clock, Gate
from agent.pipeline import IngestRequest, IngestResult, Pipeline
from agent.settings import Settings
from agent.sources.put import PutServer
from agent.sources.spool import SpoolSource
from agent.store import Eviction, Store
from agent.telemetry.logs import log_event
from agent.telemetry.metrics import Metrics
from agent.uplink import Uplink
from agent.windows.schedule import Schedule

T = TypeVar("T")
log = logging.getLogger("skyferry.daemon")


class Daemon:
    def __init__(self, settings: Settings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.keys = load_edge_keys(settings.keys.recipient_public, settings.keys.signing_key,
                                   settings.keys.dedup_key)
        self.backend = open_backend(settings.backend.url)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="skyferry-io")
        self.store = Store(settings.site.state_dir, settings.classes,
                           settings.store.quota_bytes)
        self.pipeline = Pipeline(settings.site.id, self.keys, self.store, settings.chunking,
                                 settings.compression)
        anchor = clock()
        # `skyferry status` needs the anchor to tell where a simulated cycle stands.
        self.store.set_meta("cycle_anchor", repr(anchor))
        self.gate = Gate(Schedule(settings.windows, anchor=anchor), clock)
        self.uplink = Uplink(settings.site.id, self.store, self.backend, self.gate,
                             settings.uplink, self.run_blocking, self.metrics, clock)
        self.spools = [SpoolSource(s, self.ingest) for s in settings.spools]
        self.put_server = PutServer(settings.put.socket, self.ingest,
                                    [c.name for c in settings.classes])

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """The one way blocking work leaves the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def ingest(self, req: IngestRequest) -> IngestResult:
        try:
            result = await self.run_blocking(self.pipeline.ingest_file, req)
        except QuotaExceededError:
            self.metrics.refusals.labels(req.priority).inc()
            raise
        self._count_evictions(result.evicted)
        if result.duplicate_of is None:
            self.metrics.ingested_bytes.labels(req.priority).inc(result.size)
            self.metrics.ingested_objects.labels(req.priority).inc()
            self.metrics.stored_bytes.labels(req.priority).inc(result.stored_bytes)
            self.metrics.dedup_chunks.inc(result.chunks - result.new_chunks)
        self.uplink.notify()
        return result

    def _count_evictions(self, evicted: tuple[Eviction, ...] | list[Eviction]) -> None:
        for ev in evicted:
            self.metrics.evictions.labels(ev.priority, ev.reason).inc()
            log_event(log, logging.WARNING, "object_evicted",
                      f"dropped queued object ({ev.reason}) to stay within limits",
                      object=ev.object_id, bytes=ev.size, **{"class": ev.priority})

    async def _housekeeping(self) -> None:
        was_open: bool | None = None
        while True:
            self._count_evictions(await self.run_blocking(self.store.expire, self.clock()))
            self.metrics.quota_used.set(self.store.used_bytes)
            is_open = self.gate.is_open()
            self.metrics.gate_open.set(1 if is_open else 0)
            if is_open != was_open:
                state = self.gate.state()
                log_event(log, logging.INFO, "gate_open" if is_open else "gate_closed",
                          f"gate {'open' if is_open else 'closed'}",
                          next_change=state.next_change)
                was_open = is_open
            await asyncio.sleep(0.2)

    def _serve_metrics(self) -> None:
        listen = self.settings.telemetry.metrics_listen
        if listen is not None:
            start_http_server(listen[1], addr=listen[0], registry=self.metrics.registry)

    async def run(self, stop: asyncio.Event) -> None:
        self._serve_metrics()
        log_event(log, logging.INFO, "started", "skyferry started", site=self.settings.site.id,
                  pending=self.store.pending_objects())
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.gate.run(), name="gate"),
                    tg.create_task(self.uplink.run(), name="uplink"),
                    tg.create_task(self.put_server.run(), name="put"),
                    tg.create_task(self._housekeeping(), name="housekeeping"),
                    *(tg.create_task(s.run(), name=f"spool-{s.settings.name}")
                      for s in self.spools),
                ]
                await stop.wait()
                log_event(log, logging.INFO, "stopping", "stopping: in-flight uploads are "
                          "released and will be re-sent next time")
                for t in tasks:
                    t.cancel()
        finally:
            await self.uplink.drain_acks()
            self.executor.shutdown(wait=True)
            self.store.close()
            self.settings.put.socket.unlink(missing_ok=True)
            log_event(log, logging.INFO, "stopped", "skyferry stopped")


async def run_daemon(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(settings)
    with contextlib.suppress(asyncio.CancelledError):
        await daemon.run(stop)
