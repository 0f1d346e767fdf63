"""The windows side of the daemon in one object: forecast, link monitor, learned model, budget.

agent/daemon/wiring.py only constructs this, hands `schedule` to the Gate and `admission` to the
Uplink, attaches the gate, and runs `tasks()`; everything about windows stays in this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from agent.backends.protocol import Backend
from agent.backends.registry import probe_target
from agent.config.settings import Settings, WindowSettings
from agent.host.blocking import RunBlocking
from agent.obs.logs import log_event
from agent.store.store import Store
from agent.uplink.budget import Admission, RateMeter, horizon_budget
from agent.uplink.gate import Clock, Gate
from agent.windows.forecast import Forecast, build_forecast
from agent.windows.learned import META_KEY, LearnedModel
from agent.windows.linkmonitor import LinkMonitor, make_probe, pre_pass
from agent.windows.schedule import Schedule

log = logging.getLogger("skyferry.windows")
SAVE_MODEL_EVERY_S = 300.0
WARM_UP_KEY = ".skyferry-warm-up"  # HEAD of a key that need not exist opens the connection


class WindowRuntime:
    def __init__(self, settings: Settings, store: Store, backend: Backend, clock: Clock,
                 anchor: float, metrics: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.clock = clock
        self.anchor = anchor
        self.metrics = metrics
        w = settings.windows
        self.model = LearnedModel.from_json(store.get_meta(META_KEY)) if w.link.learn else None
        self.forecast: Forecast = build_forecast(w, anchor, self.model, now=clock())
        self.meter = RateMeter()
        probe = make_probe(w.link, probe_target(settings.backend))
        self.monitor: LinkMonitor | None = None
        if probe is not None:
            self.monitor = LinkMonitor(
                probe, w.link, clock, model=self.model, throughput=self.meter.rate,
                next_window_start=self._next_window_start, metrics=metrics)
        self.admission = Admission(
            lambda t: self.forecast.window_at(t), clock, post_pass_s=w.post_pass_s,
            uplink_rate_bps=settings.uplink.rate_bps, meter=self.meter,
            rtt=lambda: self.monitor.rtt_s if self.monitor is not None else None,
            rate_at=lambda t: self.forecast.rate_at(t), max_streams=settings.uplink.streams)
        self.gate: Gate | None = None

    @property
    def schedule(self) -> Schedule:
        return self.forecast.schedule

    def _next_window_start(self, t: float) -> float | None:
        return self.forecast.next_window_start(t)

    def link_budget(self, now: float, horizon_s: float) -> int | None:
        """Bytes the link is predicted to carry in the next `horizon_s` (blocking: passes may be
        predicted); None when no rate is known."""
        return horizon_budget(self.forecast.upcoming(now, now + horizon_s), now, horizon_s,
                              self.meter.rate(), self.admission.uplink_rate_bps)

    def attach(self, gate: Gate) -> None:
        """Link state drives the gate from now on."""
        self.gate = gate
        if self.monitor is not None:
            self.monitor.on_change = gate.set_link
            gate.set_link(self.monitor.up)

    def reload(self, windows: WindowSettings) -> Schedule:
        """New [windows] settings (SIGHUP): a new forecast; the learned model is kept."""
        self.forecast = build_forecast(windows, self.anchor, self.model, now=self.clock())
        self.admission.post_pass_s = windows.post_pass_s
        return self.forecast.schedule

    def tasks(self, run_blocking: RunBlocking) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        out: list[tuple[str, Coroutine[Any, Any, None]]] = [
            ("windows-forecast", self._maintain(run_blocking)),
            ("windows-pre-pass", pre_pass(
                self._next_window_start, self.settings.windows.pre_pass_s, self.clock,
                self.monitor, self._warm_up)),
        ]
        if self.monitor is not None:
            out.append(("link-monitor", self.monitor.run()))
        if self.model is not None:
            out.append(("learned-save", self._save_loop(run_blocking)))
        return out

    async def _maintain(self, run_blocking: RunBlocking) -> None:
        # The forecast object is replaced on reload: follow it.
        while True:
            forecast = self.forecast
            task = asyncio.ensure_future(forecast.maintain(run_blocking, self.clock, self.metrics))
            try:
                while self.forecast is forecast and not task.done():
                    await asyncio.sleep(1.0)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _warm_up(self) -> None:
        await self.backend.size(WARM_UP_KEY)

    async def _save_loop(self, run_blocking: RunBlocking) -> None:
        while True:
            await asyncio.sleep(SAVE_MODEL_EVERY_S)
            await run_blocking(self.save)

    def save(self) -> None:
        """Persist the learned model (blocking; also called once at shutdown)."""
        if self.model is None or self.store.read_only:
            return
        try:
            self.store.set_meta(META_KEY, self.model.to_json())
        except Exception as e:  # never let bookkeeping take the daemon down
            log_event(log, logging.WARNING, "learned_save_failed",
                      f"could not save the learned link model: {e}")
