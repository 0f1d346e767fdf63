"""SIGHUP: what a re-read configuration may change in a running daemon, and what needs a restart.

Windows, spool folders, MQTT (subscriptions, batching, broker, status), the upload rate and the
log level are applied in place; the queue is never touched. Anything that defines the queue or
the identity of the site (site, keys, store, classes, chunking, backend, ...) keeps its running
value and is named in a warning, because changing it under a live queue could strand data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from agent.config.settings import Settings

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
