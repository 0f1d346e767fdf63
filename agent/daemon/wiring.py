"""Wiring only: build the parts from settings, run them in one TaskGroup, stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agent.backends.core import open_backend
from agent.config.settings import Settings, SpoolSettings
from agent.daemon.reload import plan_reload
from agent.daemon.window_runtime import WindowRuntime
from agent.errors import DiskFullError, QuotaExceededError, SkyferryError
from agent.format.keys import load_edge_keys
from agent.ingest.compression_policy import HORIZON_S, RETUNE_EVERY_S, AutoLevel
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import BatchRequest, IngestRequest, IngestResult, PackResult
from agent.obs.logs import log_event, set_log_level
from agent.obs.metrics import Metrics
from agent.sources import spool_lease
from agent.sources.mqtt import MqttSource
from agent.sources.put import PutServer
from agent.sources.spool import SpoolSource
from agent.store.store import Eviction, Store
from agent.telemetry.notify import Notifier
from agent.telemetry.service import ServiceTelemetry
from agent.uplink.backend_check import BackendHealth
from agent.uplink.gate import Clock, Gate
from agent.uplink.uplink import Uplink

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")
log = logging.getLogger("skyferry.daemon")


INGEST_WORKERS = 2  # objects sealed at once per spool: the edge boxes have two cores or more
MQTT_DRAIN_S = 20.0  # at most this long making received messages durable at SIGTERM
LINK_BUDGET_EVERY_S = 30.0  # `level = "auto"`: how often the next 24 h's link budget is redone
STORE_LOCK_WAIT_S = 10.0  # at start, how long another process may hold the store
EXPIRE_EVERY_S = 1.0  # how often objects past their class's ttl are dropped (a query in a thread)


class Daemon:
    def __init__(self, settings: Settings, clock: Clock = time.time,
                 notifier: Notifier | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.keys = load_edge_keys(settings.keys.recipient_public, settings.keys.signing_key,
                                   settings.keys.dedup_key)
        self.backend = open_backend(settings.backend)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="skyferry-io")
        # A `skyferry put` writing directly (it found no daemon) holds the store a moment.
        self.store = Store(settings.site.state_dir, settings.classes,
                           settings.store.quota_bytes, lock_wait_s=STORE_LOCK_WAIT_S)
        self.pipeline = Pipeline(settings.site.id, self.keys, self.store, settings.chunking,
                                 settings.compression)
        self.auto_level: AutoLevel | None = None  # `level = "auto"` (compression_policy.py)
        if settings.compression.level == "auto":
            cpus = len(os.sched_getaffinity(0))
            self.auto_level = AutoLevel(self.pipeline.compressor, cpus,
                                        min(cpus, INGEST_WORKERS * max(1, len(settings.spools))))
        self._link_budget: tuple[float, int | None] | None = None  # (when, bytes)
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
        self.spools = [self._spool(s) for s in settings.spools]
        self.put_server = PutServer(settings.put.socket, self.ingest,
                                    [c.name for c in settings.classes],
                                    status=lambda: self.service.live_status())
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.mqtt = self._mqtt_source(settings)
        self.service = ServiceTelemetry(
            settings, store=self.store, gate=self.gate, wake_uplink=self.uplink.notify,
            run_blocking=self.run_blocking, metrics=self.metrics,
            notifier=notifier or Notifier(None), environ=self.environ, clock=clock)
        self.service.mqtt_source = self.mqtt
        # Backend checked at start and at each window opening (agent/uplink/backend_check.py).
        self.backend_health = BackendHealth(self.backend, self.gate, self.metrics, clock,
                                            settings.uplink.retry_max_s)
        self.uplink.health = self.service.backend_health = self.backend_health
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def _mqtt_source(self, settings: Settings) -> MqttSource | None:
        if settings.mqtt is None or not settings.mqtt.subscriptions:
            return None
        return MqttSource(settings.mqtt, self.ingest_batch, self.run_blocking, self.metrics,
                          self.environ)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """The one way blocking work leaves the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    def _sealing(self) -> contextlib.AbstractContextManager[None]:
        """Around an ingest call: how busy ingest is informs `level = "auto"`."""
        if self.auto_level is None:
            return contextlib.nullcontext()
        return self.auto_level.ingest.sealing()

    async def _sealed(self, fn: Callable[[A], R], arg: A, priority: str) -> R:
        """Run one pipeline ingest call off the loop; a refusal is counted, then re-raised."""
        try:
            with self._sealing():
                return await self.run_blocking(fn, arg)
        except QuotaExceededError as e:
            self._count_refusal(priority, e)
            raise

    def _ingested(self, priority: str, evicted: tuple[Eviction, ...], size: int, items: int,
                  stored: int, chunks: int, new_chunks: int) -> None:
        """Metrics of one sealed object (`items`: files or batches it holds)."""
        self._count_evictions(evicted)
        self.metrics.ingested_bytes.labels(priority).inc(size)
        self.metrics.ingested_objects.labels(priority).inc(items)
        self.metrics.stored_bytes.labels(priority).inc(stored)
        self.metrics.dedup_chunks.inc(chunks - new_chunks)

    async def ingest(self, req: IngestRequest) -> IngestResult:
        result = await self._sealed(self.pipeline.ingest_file, req, req.priority)
        if result.duplicate_of is None:
            self._ingested(req.priority, result.evicted, result.size, 1, result.stored_bytes,
                           result.chunks, result.new_chunks)
        else:
            self._count_evictions(result.evicted)
        self.uplink.notify()
        return result

    def _spool(self, spool: SpoolSettings) -> SpoolSource:
        return SpoolSource(spool, self.ingest, self.ingest_pack, self.settings.chunking,
                           workers=INGEST_WORKERS, protected=self._key_paths(),
                           metrics=self.metrics, state_dir=self.settings.site.state_dir)

    def _key_paths(self) -> tuple[Path, ...]:
        """What no spool may ever read besides the state_dir: the keys and their folders."""
        keys = self.settings.keys
        files = (keys.recipient_public, keys.signing_key, keys.dedup_key)
        return (*files, *{f.parent for f in files})

    async def ingest_pack(self, reqs: list[IngestRequest]) -> PackResult:
        """Like `ingest`, for small files sealed together (one pack)."""
        result = await self._sealed(self.pipeline.ingest_pack, reqs, reqs[0].priority)
        if result.object_id is None:
            self._count_evictions(result.evicted)
            return result
        fresh = sum(1 for r in result.accepted.values() if r.duplicate_of is None)
        self._ingested(reqs[0].priority, result.evicted, result.size, fresh,
                       result.stored_bytes, result.chunks, result.new_chunks)
        self.uplink.notify()
        return result

    async def ingest_batch(self, req: BatchRequest) -> IngestResult:
        """Like `ingest`, for an in-memory batch (MQTT)."""
        result = await self._sealed(self.pipeline.ingest_batch, req, req.priority)
        self._ingested(req.priority, result.evicted, result.size, 1, result.stored_bytes,
                       result.chunks, result.new_chunks)
        self.uplink.notify()
        return result

    def _count_refusal(self, priority: str, e: QuotaExceededError) -> None:
        self.metrics.refusals.labels(priority).inc()
        if isinstance(e, DiskFullError):  # the disk, not the quota: worth its own alert
            self.metrics.errors.labels("disk_full").inc()

    def _count_evictions(self, evicted: tuple[Eviction, ...] | list[Eviction]) -> None:
        for ev in evicted:
            self.metrics.evictions.labels(ev.priority, ev.reason).inc()
            log_event(log, logging.WARNING, "object_evicted",
                      f"dropped queued object ({ev.reason}) to stay within limits",
                      object=ev.object_id, bytes=ev.size, **{"class": ev.priority})

    async def _retune_compression(self, first: bool) -> None:
        """`level = "auto"`: choose the level again from the backlog and the link budget."""
        auto = self.auto_level
        if auto is None:
            return
        now = self.clock()
        if self._link_budget is None or abs(now - self._link_budget[0]) >= LINK_BUDGET_EVERY_S:
            try:
                budget = await self.run_blocking(self.windows.link_budget, now, HORIZON_S)
            except Exception as e:  # a forecast problem must not stop housekeeping
                log_event(log, logging.WARNING, "link_budget_failed",
                          f"could not predict the link budget, keeping the last one: {e}")
                budget = None if self._link_budget is None else self._link_budget[1]
            self._link_budget = (now, budget)
        waiting = sum(s.ready_bytes for s in self.spools)
        if auto.update(self.store.used_bytes, waiting, self._link_budget[1]) or first:
            c = auto.choice
            self.metrics.compression_level.set(c.level)
            self.metrics.compression_long_distance.set(1 if c.long_distance else 0)
            log_event(log, logging.INFO, "compression_level",
                      f"compression level {c.level}: {c.reason}", zstd_level=c.level,
                      long_distance=c.long_distance, regime=c.regime)

    async def _housekeeping(self) -> None:
        was_open: bool | None = None
        retune_at: float | None = None
        expire_at = 0.0
        while True:
            if retune_at is None or time.monotonic() >= retune_at:
                await self._retune_compression(first=retune_at is None)
                retune_at = time.monotonic() + RETUNE_EVERY_S
            if time.monotonic() >= expire_at:  # a query in a thread: not at the gate's pace
                self._count_evictions(await self.run_blocking(self.store.expire, self.clock()))
                expire_at = time.monotonic() + EXPIRE_EVERY_S
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

    def _spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        assert self._tg is not None
        self._tasks[name] = self._tg.create_task(coro, name=name)

    async def _cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self, stop: asyncio.Event) -> None:
        self.service.start_server()
        log_event(log, logging.INFO, "started", "skyferry started", site=self.settings.site.id,
                  pending=self.store.pending_objects())
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._spawn("gate", self.gate.run())
                self._spawn("backend-health", self.backend_health.run())
                self._spawn("uplink", self.uplink.run())
                self._spawn("put", self.put_server.run())
                self._spawn("housekeeping", self._housekeeping())
                for name, coro in self.windows.tasks(self.run_blocking):
                    self._spawn(name, coro)
                for s in self.spools:
                    self._spawn(f"spool-{s.settings.name}", s.run())
                if self.mqtt is not None:
                    self._spawn("mqtt", self.mqtt.run())
                for name, coro in self.service.tasks():
                    self._spawn(name, coro)
                await self.service.ready()
                await stop.wait()
                log_event(log, logging.INFO, "stopping", "stopping: received MQTT messages are "
                          "made durable, in-flight uploads are released and re-sent next time")
                await self._drain()
                for t in self._tasks.values():
                    t.cancel()
        finally:
            await self.uplink.drain_acks()
            self.windows.save()  # the learned link model, before the store closes
            self.executor.shutdown(wait=True)
            self.store.close()
            self.service.close()
            self.settings.put.socket.unlink(missing_ok=True)
            log_event(log, logging.INFO, "stopped", "skyferry stopped")

    async def _drain(self) -> None:
        """SIGTERM: finish what was accepted from producers, abandon what was not."""
        await self.service.stopping()
        self.pipeline.stopping.set()  # a file half-read stays in its spool for next time
        if self.mqtt is not None:
            try:
                async with asyncio.timeout(_mqtt_drain_s(self.environ)):
                    await self.mqtt.drain()
            except TimeoutError:
                # The MQTT task still finishes the batches it is committing and acknowledges
                # them before it closes the connection (a committed batch never comes twice).
                log_event(log, logging.WARNING, "mqtt_drain_timeout",
                          "MQTT messages not yet in a batch are left to the broker to re-send",
                          pending=self.mqtt.pending)

    async def reload(self, config: Path) -> None:
        """SIGHUP: re-read the file and apply windows, sources, rates; the queue stays."""
        from agent.daemon.preflight import load_checked

        self.service.notifier.reloading()
        try:
            new = await self.run_blocking(load_checked, config)
        except SkyferryError as e:
            self.metrics.errors.labels("reload").inc()
            log_event(log, logging.ERROR, "reload_failed",
                      f"configuration not reloaded, still running the previous one: {e}")
            self.service.notifier.ready("running (reload failed)")
            return
        plan = plan_reload(self.settings, new)
        for what in plan.needs_restart:
            log_event(log, logging.WARNING, "reload_needs_restart",
                      f"{what} changed: it takes effect only after a restart", setting=what)
        if plan.windows:
            # In a thread: new element files mean predicting passes, which takes a moment.
            self.gate.set_schedule(await self.run_blocking(self.windows.reload, new.windows))
        if plan.rate:
            self.uplink.limiter.set_rate(new.uplink.rate_bps)
            self.windows.admission.uplink_rate_bps = new.uplink.rate_bps
        if plan.log_level:
            set_log_level(new.telemetry.log_level)
        if plan.spools:
            await self._replace_spools(plan.settings)
        if plan.mqtt:
            await self._replace_mqtt(plan.settings)
        self.settings = plan.settings
        log_event(log, logging.INFO, "reloaded", "configuration reloaded: "
                  + (", ".join(plan.changes) or "nothing changed"), changed=list(plan.changes))
        self.service.notifier.ready("running (reloaded)")

    async def _replace_spools(self, settings: Settings) -> None:
        keep = {s.settings: s for s in self.spools}
        wanted = set(settings.spools)
        for s in self.spools:
            if s.settings not in wanted:
                await self._cancel(f"spool-{s.settings.name}")
        self.spools = [keep.get(sp) or self._spool(sp) for sp in settings.spools]
        for s in self.spools:
            if s.settings not in keep:
                self._spawn(f"spool-{s.settings.name}", s.run())

    async def _replace_mqtt(self, settings: Settings) -> None:
        new = settings.mqtt
        if (self.mqtt is not None and new is not None and new.subscriptions
                and self.mqtt.can_update(new)):
            await self.mqtt.update(new)  # same connection: nothing in flight is re-sent
        else:
            await self._reconnect_mqtt(settings)
        await self._cancel("mqtt-status")
        status = await self.service.replace_mqtt_status(settings)
        if status is not None:
            self._spawn("mqtt-status", status)

    async def _reconnect_mqtt(self, settings: Settings) -> None:
        # Received messages are made durable (and acknowledged) before the old connection
        # closes; the new one resumes the same broker session, so nothing is lost.
        if self.mqtt is not None:
            await self.mqtt.drain()
            await self._cancel("mqtt")
        self.mqtt = self._mqtt_source(settings)
        self.service.mqtt_source = self.mqtt
        if self.mqtt is not None:
            self._spawn("mqtt", self.mqtt.run())


def _mqtt_drain_s(environ: Mapping[str, str]) -> float:
    """MQTT_DRAIN_S; TEST ONLY, with SKYFERRY_TEST_HOOKS=1: $SKYFERRY_TEST_MQTT_DRAIN_S, so a
    test can make the drain time out while a batch is being committed."""
    if environ.get("SKYFERRY_TEST_HOOKS") != "1":
        return MQTT_DRAIN_S
    return float(environ.get("SKYFERRY_TEST_MQTT_DRAIN_S", MQTT_DRAIN_S))


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
