"""Wiring only: build the parts from settings, run them in one TaskGroup, stop cleanly.

Lifetimes are entered on exit stacks as the parts are built (the store, the executors, the
telemetry tap in `__init__`; the metrics port, the put socket and the stop-time flushes in
`run`), so shutdown runs in the reverse order of start-up. The jobs live in their own modules:
intake.py (ingest accounting), retune.py (`level = "auto"`), housekeeping.py, source_set.py
(spools, MQTT), reload.py (SIGHUP), window_runtime.py (forecast, link, budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from agent.backends.registry import open_backend
from agent.config.settings import Settings
from agent.daemon.housekeeping import Housekeeping
from agent.daemon.intake import Intake
from agent.daemon.reload import Reloader
from agent.daemon.retune import CompressionRetune, auto_level
from agent.daemon.source_set import INGEST_WORKERS, SourceSet
from agent.daemon.tasks import TaskSet
from agent.daemon.window_runtime import WindowRuntime
from agent.format.keys import load_edge_keys
from agent.host.blocking import Executors
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest, IngestResult
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.sources import spool_lease
from agent.sources.put import PutServer
from agent.store.store import Store
from agent.telemetry.notify import Notifier
from agent.telemetry.service import ServiceTelemetry
from agent.uplink.backend_check import BackendHealth
from agent.uplink.gate import Clock, Gate
from agent.uplink.uplink import Uplink

log = logging.getLogger("skyferry.daemon")
STORE_LOCK_WAIT_S = 10.0  # at start, how long another process may hold the store


class Daemon:
    def __init__(self, settings: Settings, clock: Clock = time.time,
                 notifier: Notifier | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        with contextlib.ExitStack() as lifetimes:
            self._build(lifetimes, notifier or Notifier(None))
            self._lifetimes = lifetimes.pop_all()  # closed when `run` ends

    def _build(self, lifetimes: contextlib.ExitStack, notifier: Notifier) -> None:
        settings, clock = self.settings, self.clock
        self.metrics = Metrics()
        self.keys = load_edge_keys(settings.keys.recipient_public, settings.keys.signing_key,
                                   settings.keys.dedup_key)
        self.backend = open_backend(settings.backend)
        # A `skyferry put` writing directly (it found no daemon) holds the store a moment.
        self.store = lifetimes.enter_context(Store(
            settings.site.state_dir, settings.classes, settings.store.quota_bytes,
            lock_wait_s=STORE_LOCK_WAIT_S))
        # Entered after the store: no thread that uses the store outlives it.
        self.executors = lifetimes.enter_context(Executors())
        self.blocking = self.executors.policy
        self.run_blocking = self.executors.run_blocking
        self.pipeline = Pipeline(settings.site.id, self.keys, self.store, settings.chunking,
                                 settings.compression, seal_thread=self.executors.seal,
                                 dedup_horizon_s=settings.uplink.dedup_horizon_s)
        self.metrics.compression_level.set(self.pipeline.compressor.level)
        anchor = self.anchor = clock()
        # `skyferry status` needs the anchor to tell where a simulated cycle stands.
        self.store.set_meta("cycle_anchor", repr(anchor))
        # Forecast (schedule, timetable, passes), link monitor, learned model, window budget.
        self.windows = WindowRuntime(settings, self.store, self.backend, clock, anchor,
                                     self.metrics)
        self.gate = Gate(self.windows.schedule, clock)
        self.windows.attach(self.gate)
        self.uplink = Uplink(settings.site.id, self.store, self.backend, self.gate,
                             settings.uplink, self.run_blocking, self.metrics, clock,
                             self.windows.admission, keys=self.keys)
        if self.uplink.heartbeat is not None and (model := self.windows.model) is not None:
            self.uplink.heartbeat.learned_hit_ratio = lambda: model.hits.precision
        if self.windows.monitor is not None:  # uploads that stop being answered: link lost
            self.uplink.link.on_lost = self.windows.monitor.suspect
        # Backend checked at start and at each window opening (agent/uplink/backend_check.py).
        self.backend_health = BackendHealth(self.backend, self.gate, self.metrics, clock,
                                            settings.uplink.retry_max_s)
        self.uplink.health = self.backend_health
        self.tasks = TaskSet()
        self._build_intake()
        self.service = ServiceTelemetry(
            settings, store=self.store, gate=self.gate, wake_uplink=self.uplink.notify,
            blocking=self.blocking, metrics=self.metrics, notifier=notifier,
            environ=self.environ, clock=clock, backend_health=self.backend_health,
            mqtt_ingest=self.sources.mqtt_view)
        lifetimes.callback(self.service.close)
        self.put_server = PutServer(settings.put.socket, self.intake.ingest,
                                    [c.name for c in settings.classes],
                                    status=self.service.live_status,
                                    ingest_pack=self.intake.ingest_pack,
                                    pack_below=settings.chunking.pack_below)
        self.reloader = Reloader(
            sources=self.sources, service=self.service, windows=self.windows, gate=self.gate,
            limiter=self.uplink.limiter, tasks=self.tasks, run_blocking=self.run_blocking,
            metrics=self.metrics)

    def _build_intake(self) -> None:
        """Ingest accounting, the sources that feed it, and the housekeeping that tunes it."""
        settings = self.settings
        auto = None
        if settings.compression.level == "auto":  # agent/ingest/compression_policy.py
            auto = auto_level(self.pipeline.compressor, INGEST_WORKERS, len(settings.spools))
        self.intake = Intake(self.pipeline, self.run_blocking, self.metrics, self.uplink.notify,
                             auto)
        self.sources = SourceSet(settings, self.intake, self.tasks, self.blocking,
                                 self.metrics, self.environ)
        retune = None if auto is None else CompressionRetune(
            auto, link_budget=self.windows.link_budget, waiting_bytes=self.sources.waiting_bytes,
            used_bytes=lambda: self.store.used_bytes, run_blocking=self.run_blocking,
            metrics=self.metrics, clock=self.clock)
        self.housekeeping = Housekeeping(
            store=self.store, gate=self.gate, metrics=self.metrics, clock=self.clock,
            run_blocking=self.run_blocking, count_evictions=self.intake.count_evictions,
            retune=retune)

    async def ingest(self, req: IngestRequest) -> IngestResult:
        """One file, as `skyferry put` sends it (in-process harnesses ingest through this)."""
        return await self.intake.ingest(req)

    async def run(self, stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(log_event, log, logging.INFO, "stopped", "skyferry stopped")
            stack.enter_context(self._lifetimes)
            self.service.start_server()
            stack.callback(self.service.stop_server)
            stack.callback(self.settings.put.socket.unlink, missing_ok=True)
            stack.callback(self.windows.save)  # the learned link model, before the store closes
            # Acknowledged uploads reach the index before the store closes.
            stack.push_async_callback(self.uplink.drain_acks)
            log_event(log, logging.INFO, "started", "skyferry started",
                      site=self.settings.site.id, pending=self.store.pending_objects())
            async with asyncio.TaskGroup() as tg:
                self.tasks.bind(tg)
                self.tasks.spawn_all([
                    ("gate", self.gate.run()),
                    ("backend-health", self.backend_health.run()),
                    ("uplink", self.uplink.run()),
                    ("put", self.put_server.run()),
                    ("housekeeping", self.housekeeping.run()),
                    *self.windows.tasks(self.run_blocking),
                ])
                self.sources.start()
                self.tasks.spawn_all(self.service.tasks())
                await self.service.ready()
                await stop.wait()
                log_event(log, logging.INFO, "stopping", "stopping: received MQTT messages are "
                          "made durable, in-flight uploads are released and re-sent next time")
                await self._drain()
                self.tasks.cancel_all()

    async def _drain(self) -> None:
        """SIGTERM: finish what was accepted from producers, abandon what was not."""
        await self.service.stopping()
        self.pipeline.stopping.set()  # a file half-read stays in its spool for next time
        await self.sources.drain()

    async def reload(self, config: Path) -> None:
        """SIGHUP: re-read the file and apply windows, sources, rates; the queue stays."""
        self.settings = await self.reloader.reload(self.settings, config)


def _test_hooks(loop: asyncio.AbstractEventLoop, environ: Mapping[str, str]) -> None:
    """TEST ONLY, off unless SKYFERRY_TEST_HOOKS=1: SIGUSR2 blocks the event loop for
    $SKYFERRY_TEST_BLOCK_S seconds, so a test can prove the watchdog notices a stuck loop."""
    if environ.get("SKYFERRY_TEST_HOOKS") != "1":
        return
    block_s = float(environ.get("SKYFERRY_TEST_BLOCK_S", "3"))

    def block() -> None:
        log_event(log, logging.WARNING, "test_block_loop", f"TEST HOOK: blocking {block_s}s")
        time.sleep(block_s)

    loop.add_signal_handler(signal.SIGUSR2, block)


async def run_daemon(settings: Settings, config: Path | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    environ = os.environ
    notifier = Notifier.from_environ(environ, os.getpid())
    daemon = Daemon(settings, notifier=notifier, environ=environ)
    reloads: set[asyncio.Task[None]] = set()
    if config is not None:
        def reload() -> None:
            task = loop.create_task(daemon.reload(config))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
    # A writer opening a spool file the daemon holds a read lease on sends SIGIO, whose
    # default action would end the daemon (agent/sources/spool_lease.py).
    spool_lease.install_sigio_handler()
    _test_hooks(loop, environ)
    with contextlib.suppress(asyncio.CancelledError):
        await daemon.run(stop)
