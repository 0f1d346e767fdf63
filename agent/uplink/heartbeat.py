"""The site's heartbeat publisher: at each window opening, and every `interval_s` while the gate
stays open, one small signed heartbeat (agent/format/heartbeat.py) goes to the backend.

It runs beside the upload workers, never in their place: a heartbeat is one small create-only
PUT of its own, outside the window byte budget, and a failed one is only logged (the next
window sends a fresh one). What it says is read from the store, the disk, the metrics and the
gate; nothing here changes the queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime

import agent
from agent.backends.protocol import Backend
from agent.errors import BackendError, DiskFullError, ObjectConflictError, PermanentBackendError
from agent.format.crypto import EdgeKeys
from agent.format.heartbeat import ClassQueue, Forecast, Heartbeat, seal_heartbeat
from agent.host.blocking import RunBlocking
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.store.store import Store
from agent.uplink.attempts import Attempts
from agent.uplink.gate import Clock, Gate
from agent.uplink.trouble import Trouble
from agent.windows import PREDICT_AHEAD_S  # as far as windows are predicted ahead

log = logging.getLogger("skyferry.uplink")

HEARTBEAT_INTERVAL_S = 600.0  # while a window stays open (an always-on link: every 10 min)
TICK_S = 1.0  # how often the gate is looked at (windows are tallied at this resolution)
SEQ_META = "heartbeat_seq"
ERRORS_SERIES = "skyferry_errors"


class WindowTally:
    """The predicted windows seen since the daemon started, and in how many of them the link
    came up (as the gate saw it): the forecast's hit ratio when no learned model scores it."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.predicted = 0
        self.link_up = 0
        self._current: tuple[float, str] | None = None
        self._up_seen = False

    def observe(self, now: float) -> None:
        if self.gate.schedule.always:
            return
        w = self.gate.schedule.window_at(now)
        if w is None:
            self._current = None
            return
        ident = (w.start, w.source)
        if ident != self._current:
            self._current, self._up_seen = ident, False
            self.predicted += 1
        if not self._up_seen and self.gate.link_up:
            self._up_seen = True
            self.link_up += 1

    def forecast(self, learned: float | None) -> Forecast:
        if learned is not None:
            return Forecast(learned, "learned", self.predicted, self.link_up)
        if self.gate.schedule.always:
            return Forecast(None, "always", 0, 0)
        ratio = self.link_up / self.predicted if self.predicted else None
        return Forecast(ratio, "windows" if ratio is not None else None, self.predicted,
                        self.link_up)


def error_counts(metrics: Metrics) -> dict[str, float]:
    """The daemon's error counter by kind, as exported."""
    out: dict[str, float] = {}
    for family in metrics.registry.collect():
        if family.name == ERRORS_SERIES:
            for s in family.samples:
                if s.name == f"{ERRORS_SERIES}_total":
                    out[s.labels.get("kind", "")] = s.value
    return out


class HeartbeatPublisher:
    """`learned_hit_ratio` (set by the daemon when a learned link model runs) reads the model's
    score; `interval_s` is the cadence while a window stays open. Like the upload workers, it
    sends nothing while the backend refuses (`trouble`: its check, its pauses)."""

    def __init__(self, site: str, keys: EdgeKeys, store: Store, gate: Gate, backend: Backend,
                 attempts: Attempts, trouble: Trouble, run_blocking: RunBlocking,
                 metrics: Metrics, clock: Clock, interval_s: float = HEARTBEAT_INTERVAL_S
                 ) -> None:
        self.site, self.keys, self.store, self.gate = site, keys, store, gate
        self.backend, self.attempts, self.run_blocking = backend, attempts, run_blocking
        self.trouble = trouble
        self.metrics, self.clock, self.interval_s = metrics, clock, interval_s
        self.tally = WindowTally(gate)
        self.learned_hit_ratio: Callable[[], float | None] | None = None
        self._errors_sent: dict[str, float] = {}
        self.sent = 0

    async def loop(self) -> None:
        opened = -1
        last = -math.inf
        while True:
            self.tally.observe(self.clock())
            due = (self.gate.windows_opened != opened
                   or time.monotonic() - last >= self.interval_s)
            if self.gate.is_open() and due and self._backend_usable():
                opened, last = self.gate.windows_opened, time.monotonic()
                try:
                    await self.attempts.while_open(self.send)
                except PermanentBackendError as e:  # one line per episode, with the workers'
                    self.trouble.refused(e)
                except Exception as e:  # a heartbeat never stops the uploads: one line
                    known = isinstance(e, BackendError | DiskFullError | OSError)
                    log_event(log, logging.WARNING if known else logging.ERROR,
                              "heartbeat_failed", f"the site's heartbeat was not sent: {e}; "
                              "the next window (or interval) sends a fresh one")
            await asyncio.sleep(TICK_S)

    def _backend_usable(self) -> bool:
        health = self.trouble.health
        return ((health is None or health.usable())
                and time.monotonic() >= self.trouble.paused_until)

    def _next_window(self, now: float) -> str | None:
        sched = self.gate.schedule
        if sched.always:
            return None
        for c in sched.contacts(now, now + PREDICT_AHEAD_S):
            if c.start > now:
                return datetime.fromtimestamp(c.start, UTC).isoformat(timespec="seconds")
        return None

    async def send(self) -> Heartbeat | None:
        """Build, seal and put one heartbeat; None when its key was taken."""
        now = self.clock()
        errors = error_counts(self.metrics)
        delta = {k: round(v - self._errors_sent.get(k, 0.0)) for k, v in errors.items()}
        delta = {k: v for k, v in delta.items() if v > 0}
        learned = self.learned_hit_ratio() if self.learned_hit_ratio is not None else None
        forecast = self.tally.forecast(learned)
        hb: Heartbeat = await self.run_blocking(
            self._build, now, delta, forecast, self._next_window(now))
        blob = seal_heartbeat(hb, self.keys)
        try:
            await self.attempts.with_retries(
                lambda n: self.backend.put_if_absent(hb.key, blob, probe_first=n > 1))
        except ObjectConflictError as e:
            log_event(log, logging.WARNING, "heartbeat_conflict", str(e), key=hb.key)
            return None
        self._errors_sent = errors
        self.sent += 1
        self.metrics.sent_bytes.labels("heartbeat").inc(len(blob))
        log_event(log, logging.DEBUG, "heartbeat_sent", "heartbeat sent", key=hb.key)
        return hb

    def _build(self, now: float, errors: dict[str, int], forecast: Forecast,
               next_window: str | None) -> Heartbeat:
        """Blocking: reads the store and the disk, and takes the next sequence number."""
        seq = int(self.store.get_meta(SEQ_META) or 0) + 1
        self.store.set_meta(SEQ_META, str(seq))
        queue = {}
        for name, s in self.store.summary(now).items():
            age = s.oldest_queued_age_s
            queue[name] = ClassQueue(s.items.get("queued", 0), s.bytes.get("queued", 0),
                                     None if age is None else round(age, 3))
        ages = [c.oldest_age_s for c in queue.values() if c.oldest_age_s is not None]
        created = datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")
        return Heartbeat(
            site=self.site, seq=seq, created=created, software=agent.__version__,
            queue=queue, oldest_queued_age_s=max(ages) if ages else None,
            disk_free_bytes=shutil.disk_usage(self.store.state_dir).free,
            store_used_bytes=self.store.used_bytes, errors=sum(errors.values()),
            errors_by_kind=errors, forecast=forecast, interval_s=self.interval_s,
            next_window=next_window)
