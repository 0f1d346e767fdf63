"""What an operator sees from far away, in one object the daemon wires in: the service
manager (sd_notify), the metrics port and status page, MQTT status and commands, and the
snapshot they all read.

Telemetry sits beside the sources, not above them: what it shows of the MQTT source comes in
through `MqttIngestView`, a callable the daemon hands over, so this room never imports sources.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from agent.config.settings import Settings
from agent.host.blocking import Blocking
from agent.obs.events import EventTap
from agent.obs.logs import attach_tap, detach_tap, log_event
from agent.obs.metrics import Metrics
from agent.store.store import Store
from agent.telemetry.command_auth import verifier_for
from agent.telemetry.commands import Commands
from agent.telemetry.notify import Notifier
from agent.telemetry.snapshot import (
    Snapshot,
    apply_to_metrics,
    collect_store,
    gate_views,
    window_budget,
    window_view,
)
from agent.telemetry.status_page import StatusServer
from agent.uplink.backend_check import BackendHealth
from agent.uplink.gate import Clock, Gate

if TYPE_CHECKING:  # imported when a site broker is configured: aiomqtt and paho weigh ~7 MiB
    from agent.telemetry.mqtt_status import MqttStatus

log = logging.getLogger("skyferry.telemetry")
SNAPSHOT_S = 1.0
SAVINGS_EVERY = 10  # snapshots between the (heavier) compression/dedup sums
STATUS_EVERY_S = 5.0  # sd_notify STATUS refresh


class MqttIngestView(Protocol):
    """What the status shows of the MQTT source (agent/sources/mqtt.py)."""

    @property
    def connected(self) -> bool: ...

    @property
    def pending(self) -> int: ...

    @property
    def last_error(self) -> str | None: ...


class ServiceTelemetry:
    def __init__(self, settings: Settings, *, store: Store, gate: Gate,
                 wake_uplink: Callable[[], None], blocking: Blocking, metrics: Metrics,
                 notifier: Notifier, environ: Mapping[str, str], clock: Clock,
                 backend_health: BackendHealth | None = None,
                 mqtt_ingest: Callable[[], MqttIngestView | None] = lambda: None) -> None:
        self.settings = settings
        self.store = store
        self.gate = gate
        self.blocking = blocking
        self.run_blocking = blocking.run
        self.metrics = metrics
        self.notifier = notifier
        self.clock = clock
        self.environ = environ
        # A callable: the daemon replaces the MQTT source on reload.
        self.mqtt_ingest = mqtt_ingest
        self.backend_health = backend_health
        self.snapshot: Snapshot | None = None
        self.server: StatusServer | None = None
        self.tap = EventTap()
        attach_tap(self.tap)
        mqtt = settings.mqtt
        self.commands = Commands(gate, store, wake_uplink, blocking.run, metrics,
                                 enabled=mqtt is not None and mqtt.status.commands)
        self.commands.verifier = verifier_for(settings)
        self.mqtt_status: MqttStatus | None = None
        if mqtt is not None and (mqtt.status.publish or mqtt.status.commands):
            from agent.telemetry.mqtt_status import MqttStatus

            self.mqtt_status = MqttStatus(mqtt, settings.site.id, self.commands,
                                          lambda: self.snapshot, self.tap, environ,
                                          refresh=self.refresh)
        self._sent: collections.deque[tuple[float, float]] = collections.deque(maxlen=12)
        self._declare_series()

    def _declare_series(self) -> None:
        """Create every labelled series at 0, so dashboards and alerts see them before the
        first event (a counter with labels has no sample until it is used)."""
        m = self.metrics
        for c in self.settings.classes:
            for counter in (m.ingested_bytes, m.ingested_objects, m.stored_bytes,
                            m.committed_objects, m.refusals, m.mqtt_messages, m.mqtt_batches):
                counter.labels(c.name)
            for reason in ("quota", "ttl"):
                m.evictions.labels(c.name, reason)
        for kind in ("chunk", "manifest"):
            m.sent_bytes.labels(kind)
        for kind in ("backend", "backend_permanent", "corrupt_chunk", "mqtt", "mqtt_ingest",
                     "reload", "metrics_port", "telemetry"):
            m.errors.labels(kind)

    # ---- start and stop --------------------------------------------------------------------

    def start_server(self) -> None:
        """Bind the metrics port; a port in use costs the page, never the data flow."""
        listen = self.settings.telemetry.metrics_listen
        if listen is None:
            return
        try:
            self.server = StatusServer(listen[0], listen[1], self.metrics.registry)
        except OSError as e:
            self.metrics.errors.labels("metrics_port").inc()
            log_event(log, logging.WARNING, "metrics_unavailable",
                      f"cannot serve metrics and the status page on {listen[0]}:{listen[1]}: "
                      f"{e.strerror}; set [telemetry] metrics_listen to a free port",
                      listen=f"{listen[0]}:{listen[1]}")
            return
        self.server.start(self.blocking.serve)
        log_event(log, logging.INFO, "metrics_listening",
                  f"metrics on http://{listen[0]}:{self.server.port}/metrics, status page at /",
                  listen=f"{listen[0]}:{self.server.port}")

    def tasks(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        out = [("snapshots", self._snapshots()), ("watchdog", self.notifier.watchdog_loop())]
        if self.mqtt_status is not None:
            out.append(("mqtt-status", self.mqtt_status.run()))
        return out

    async def replace_mqtt_status(self, settings: Settings
                                  ) -> Coroutine[Any, Any, None] | None:
        """SIGHUP changed [mqtt]: stop the status connection, return the new one's run()."""
        if self.mqtt_status is not None:
            await self.mqtt_status.stop()
        self.settings = settings
        mqtt = settings.mqtt
        self.commands.enabled = mqtt is not None and mqtt.status.commands
        self.commands.verifier = verifier_for(settings)
        self.mqtt_status = None
        if mqtt is not None and (mqtt.status.publish or mqtt.status.commands):
            from agent.telemetry.mqtt_status import MqttStatus

            self.mqtt_status = MqttStatus(mqtt, settings.site.id, self.commands,
                                          lambda: self.snapshot, self.tap, self.environ,
                                          refresh=self.refresh)
            return self.mqtt_status.run()
        return None

    async def ready(self) -> None:
        await self.refresh()
        self.notifier.ready(self.snapshot.status_line() if self.snapshot else "running")

    async def stopping(self) -> None:
        self.notifier.stopping()
        if self.mqtt_status is not None:
            await self.mqtt_status.stop()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()

    def close(self) -> None:
        detach_tap(self.tap)
        self.notifier.close()

    # ---- the snapshot loop -----------------------------------------------------------------

    async def refresh(self, with_savings: bool = False) -> Snapshot:
        now = self.clock()
        classes = await self.run_blocking(collect_store, self.store, now)
        window, next_change, timeline = gate_views(self.gate, now)
        state = self.gate.state()
        mqtt = None
        if self.settings.mqtt is not None:
            src = self.mqtt_ingest()
            mqtt = {"ingest": src is not None, "connected": bool(src and src.connected),
                    "pending": src.pending if src else 0,
                    "last_error": src.last_error if src else None,
                    "status_connected": bool(self.mqtt_status and self.mqtt_status.connected)}
        snap = Snapshot(
            site=self.settings.site.id, time=now, classes=classes, gate_open=state.open,
            paused=state.paused, flushing=state.flushing, link_up=state.link_up,
            window=window, next_change=next_change, timeline=timeline,
            quota_used=self.store.used_bytes, quota_limit=self.settings.store.quota_bytes,
            throughput_bps=self._throughput(now), mqtt=mqtt,
            problems=tuple(self.tap.recent_problems()),
            backend=None if self.backend_health is None else self.backend_health.view.to_json(),
        )
        self.snapshot = snap
        if self.server is not None:
            self.server.snapshot = snap
        apply_to_metrics(snap, self.metrics, window_budget(window, now))
        if with_savings:
            compression, dedup = await self.run_blocking(self.store.savings)
            self.metrics.compression_saved.set(compression)
            self.metrics.dedup_saved.set(dedup)
        return snap

    async def live_status(self) -> dict[str, Any]:
        """What `skyferry status` shows of the running daemon: the latest snapshot with the
        gate as it is now and the queue read now (`starting` until the first snapshot)."""
        snap = self.snapshot
        if snap is None:
            return {"pid": os.getpid(), "starting": True}
        now = self.clock()
        # Not the I/O pool: the answer must not wait behind ingests (the store is read
        # concurrently with them).
        classes = await self.blocking.answer(collect_store, self.store, now)
        state = self.gate.state()
        live = dataclasses.replace(
            snap, time=now, classes=classes, gate_open=state.open, paused=state.paused,
            flushing=state.flushing, link_up=state.link_up, next_change=state.next_change,
            window=None if state.window is None else window_view(state.window),
            quota_used=self.store.used_bytes)
        return {"pid": os.getpid(), "starting": False, "snapshot": live.to_json()}

    def _throughput(self, now: float) -> float:
        """Sealed bytes acknowledged per second over the last ~10 s."""
        reg = self.metrics.registry
        total = sum(reg.get_sample_value("skyferry_sent_bytes_total", {"kind": k}) or 0.0
                    for k in ("chunk", "manifest"))
        self._sent.append((now, total))
        t0, b0 = self._sent[0]
        return (total - b0) / (now - t0) if now > t0 else 0.0

    async def _snapshots(self) -> None:
        n = 0
        last_status = 0.0
        last_gate: tuple[bool, bool, bool] | None = None
        while True:
            try:
                snap = await self.refresh(with_savings=n % SAVINGS_EVERY == 0)
            except Exception as e:  # telemetry must never stop the data flow
                self.metrics.errors.labels("telemetry").inc()
                log_event(log, logging.WARNING, "snapshot_failed", f"status not updated: {e}")
                await asyncio.sleep(SNAPSHOT_S)
                continue
            n += 1
            if snap.flushing and snap.queued_items == 0:
                self.gate.end_flush()  # the operator's flush is done: back to the windows
            gate = (snap.gate_open, snap.paused, snap.flushing)
            if gate != last_gate and self.mqtt_status is not None:
                self.mqtt_status.poke()
            last_gate = gate
            if snap.time - last_status >= STATUS_EVERY_S:
                self.notifier.status(snap.status_line())
                last_status = snap.time
            await asyncio.sleep(SNAPSHOT_S)
