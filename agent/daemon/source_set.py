"""The daemon's ingest sources, spools and the MQTT subscriber, built from settings and replaced
in place on reload; the put socket is wired in agent/daemon/wiring.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config.settings import Settings, SpoolSettings
from agent.daemon.intake import Intake
from agent.daemon.tasks import TaskSet
from agent.host.blocking import Blocking
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.sources.spool import SpoolSource

if TYPE_CHECKING:  # imported when subscriptions are configured: aiomqtt and paho weigh ~7 MiB
    from agent.sources.mqtt import MqttSource

log = logging.getLogger("skyferry.daemon")
INGEST_WORKERS = 2  # objects sealed at once per spool: the edge boxes have two cores or more
MQTT_DRAIN_S = 20.0  # at most this long making received messages durable at SIGTERM


class SourceSet:
    def __init__(self, settings: Settings, intake: Intake, tasks: TaskSet,
                 blocking: Blocking, metrics: Metrics, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.intake = intake
        self.tasks = tasks
        self.blocking = blocking
        self.run_blocking = blocking.run
        self.metrics = metrics
        self.environ = environ
        self.spools = [self._spool(s) for s in settings.spools]
        self.mqtt = self._mqtt_source(settings)

    def mqtt_view(self) -> MqttSource | None:
        return self.mqtt

    def waiting_bytes(self) -> int:
        """Settled in the spools and not yet ingested (the compression policy asks)."""
        return sum(s.ready_bytes for s in self.spools)

    def start(self) -> None:
        for s in self.spools:
            self.tasks.spawn(f"spool-{s.settings.name}", s.run())
        if self.mqtt is not None:
            self.tasks.spawn("mqtt", self.mqtt.run())

    async def drain(self) -> None:
        """SIGTERM: make received MQTT messages durable, within a time limit."""
        if self.mqtt is None:
            return
        try:
            async with asyncio.timeout(_mqtt_drain_s(self.environ)):
                await self.mqtt.drain()
        except TimeoutError:
            # The MQTT task still finishes the batches it is committing and acknowledges
            # them before it closes the connection (a committed batch never comes twice).
            log_event(log, logging.WARNING, "mqtt_drain_timeout",
                      "MQTT messages not yet in a batch are left to the broker to re-send",
                      pending=self.mqtt.pending)

    async def replace_spools(self, settings: Settings) -> None:
        keep = {s.settings: s for s in self.spools}
        wanted = set(settings.spools)
        for s in self.spools:
            if s.settings not in wanted:
                await self.tasks.cancel(f"spool-{s.settings.name}")
        self.settings = settings
        self.spools = [keep.get(sp) or self._spool(sp) for sp in settings.spools]
        for s in self.spools:
            if s.settings not in keep:
                self.tasks.spawn(f"spool-{s.settings.name}", s.run())

    async def replace_mqtt(self, settings: Settings) -> None:
        new = settings.mqtt
        self.settings = settings
        if (self.mqtt is not None and new is not None and new.subscriptions
                and self.mqtt.can_update(new)):
            await self.mqtt.update(new)  # same connection: nothing in flight is re-sent
            return
        # Received messages are made durable (and acknowledged) before the old connection
        # closes; the new one resumes the same broker session, so nothing is lost.
        if self.mqtt is not None:
            await self.mqtt.drain()
            await self.tasks.cancel("mqtt")
        self.mqtt = self._mqtt_source(settings)
        if self.mqtt is not None:
            self.tasks.spawn("mqtt", self.mqtt.run())

    def _spool(self, spool: SpoolSettings) -> SpoolSource:
        # A spool of the most urgent class takes each file renamed into it at once; the
        # others gather what comes within `settle` into one pack, as their scans did.
        urgent = spool.priority == min(self.settings.classes, key=lambda c: c.rank).name
        return SpoolSource(spool, self.intake.ingest, self.intake.ingest_pack,
                           self.settings.chunking, workers=INGEST_WORKERS,
                           protected=self._key_paths(), metrics=self.metrics,
                           state_dir=self.settings.site.state_dir,
                           run_side=self.blocking.side, gather_s=0.0 if urgent else None)

    def _key_paths(self) -> tuple[Path, ...]:
        """What no spool may ever read besides the state_dir: the keys and their folders."""
        keys = self.settings.keys
        files = (keys.recipient_public, keys.signing_key, keys.dedup_key)
        return (*files, *{f.parent for f in files})

    def _mqtt_source(self, settings: Settings) -> MqttSource | None:
        if settings.mqtt is None or not settings.mqtt.subscriptions:
            return None
        from agent.sources.mqtt import MqttSource

        return MqttSource(settings.mqtt, self.intake.ingest_batch, self.run_blocking,
                          self.metrics, self.environ)


def _mqtt_drain_s(environ: Mapping[str, str]) -> float:
    """MQTT_DRAIN_S; TEST ONLY, with SKYFERRY_TEST_HOOKS=1: $SKYFERRY_TEST_MQTT_DRAIN_S, so a
    test can make the drain time out while a batch is being committed."""
    if environ.get("SKYFERRY_TEST_HOOKS") != "1":
        return MQTT_DRAIN_S
    return float(environ.get("SKYFERRY_TEST_MQTT_DRAIN_S", MQTT_DRAIN_S))
