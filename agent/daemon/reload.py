"""SIGHUP: what a re-read configuration may change in a running daemon, and what needs a restart.

Windows, spool folders, MQTT (subscriptions, batching, broker, status), the upload rate and the
log level are applied in place; the queue is never touched. Anything that defines the queue or
the identity of the site (site, keys, store, classes, chunking, backend, ...) keeps its running
value and is named in a warning, because changing it under a live queue could strand data.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from agent.config.settings import Settings
from agent.daemon.preflight import load_checked
from agent.daemon.source_set import SourceSet
from agent.daemon.tasks import TaskSet
from agent.daemon.window_runtime import WindowRuntime
from agent.errors import SkyferryError
from agent.host.blocking import RunBlocking
from agent.obs.logs import log_event, set_log_level
from agent.obs.metrics import Metrics
from agent.telemetry.service import ServiceTelemetry
from agent.uplink.gate import Gate
from agent.uplink.ratelimit import TokenBucket

log = logging.getLogger("skyferry.daemon")
RESTART_ONLY = ("site", "keys", "backend", "put", "store", "classes", "chunking", "compression")


@dataclass(frozen=True)
class ReloadPlan:
    settings: Settings  # what the daemon runs with after the reload
    windows: bool = False
    spools: bool = False
    mqtt: bool = False
    rate: bool = False
    log_level: bool = False
    needs_restart: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changes(self) -> tuple[str, ...]:
        names = ("windows", "spools", "mqtt", "rate", "log_level")
        return tuple(n for n in names if getattr(self, n))


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """Compare running and re-read settings; the result keeps old values for restart-only keys."""
    restart = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
    uplink = new.uplink
    if dataclasses.replace(old.uplink, rate_bps=uplink.rate_bps) != uplink:
        restart.append("uplink (all but rate)")
        uplink = dataclasses.replace(old.uplink, rate_bps=uplink.rate_bps)
    telemetry = new.telemetry
    if dataclasses.replace(old.telemetry, log_level=telemetry.log_level) != telemetry:
        restart.append("telemetry (all but log_level)")
        telemetry = dataclasses.replace(old.telemetry, log_level=telemetry.log_level)
    effective = dataclasses.replace(
        old, windows=new.windows, spools=new.spools, mqtt=new.mqtt, uplink=uplink,
        telemetry=telemetry)
    return ReloadPlan(
        settings=effective,
        windows=old.windows != new.windows,
        spools=old.spools != new.spools,
        mqtt=old.mqtt != new.mqtt,
        rate=old.uplink.rate_bps != new.uplink.rate_bps,
        log_level=old.telemetry.log_level != new.telemetry.log_level,
        needs_restart=tuple(restart),
    )


class Reloader:
    """Applies a re-read configuration to the running parts (SIGHUP)."""

    def __init__(self, *, sources: SourceSet, service: ServiceTelemetry, windows: WindowRuntime,
                 gate: Gate, limiter: TokenBucket, tasks: TaskSet, run_blocking: RunBlocking,
                 metrics: Metrics) -> None:
        self.sources = sources
        self.service = service
        self.windows = windows
        self.gate = gate
        self.limiter = limiter
        self.tasks = tasks
        self.run_blocking = run_blocking
        self.metrics = metrics

    async def reload(self, running: Settings, config: Path) -> Settings:
        """Re-read `config` and apply what may change in place; returns the settings the daemon
        runs with from now on (`running` when the file has a problem)."""
        notifier = self.service.notifier
        notifier.reloading()
        try:
            new: Settings = await self.run_blocking(load_checked, config)
        except SkyferryError as e:
            self.metrics.errors.labels("reload").inc()
            log_event(log, logging.ERROR, "reload_failed",
                      f"configuration not reloaded, still running the previous one: {e}")
            notifier.ready("running (reload failed)")
            return running
        plan = plan_reload(running, new)
        for what in plan.needs_restart:
            log_event(log, logging.WARNING, "reload_needs_restart",
                      f"{what} changed: it takes effect only after a restart", setting=what)
        if plan.windows:
            # In a thread: new element files mean predicting passes, which takes a moment.
            self.gate.set_schedule(await self.run_blocking(self.windows.reload, new.windows))
        if plan.rate:
            self.limiter.set_rate(new.uplink.rate_bps)
            self.windows.admission.uplink_rate_bps = new.uplink.rate_bps
        if plan.log_level:
            set_log_level(new.telemetry.log_level)
        if plan.spools:
            await self.sources.replace_spools(plan.settings)
        if plan.mqtt:
            await self.sources.replace_mqtt(plan.settings)
            await self.tasks.cancel("mqtt-status")
            status = await self.service.replace_mqtt_status(plan.settings)
            if status is not None:
                self.tasks.spawn("mqtt-status", status)
        log_event(log, logging.INFO, "reloaded", "configuration reloaded: "
                  + (", ".join(plan.changes) or "nothing changed"), changed=list(plan.changes))
        notifier.ready("running (reloaded)")
        return plan.settings
