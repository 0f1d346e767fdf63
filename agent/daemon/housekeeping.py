"""The daemon's small periodic jobs: the compression level (`level = "auto"`), objects past their
class's ttl, the quota gauge, and the gate's open/closed log lines."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from agent.host.blocking import RunBlocking
from agent.ingest.compression_policy import RETUNE_EVERY_S
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.store.store import Eviction, Store
from agent.uplink.gate import Clock, Gate

log = logging.getLogger("skyferry.daemon")
EXPIRE_EVERY_S = 1.0  # how often objects past their class's ttl are dropped (a query in a thread)
TICK_S = 0.2

Retune = Callable[[bool], Awaitable[None]]  # (first) -> None


class Housekeeping:
    def __init__(self, *, store: Store, gate: Gate, metrics: Metrics, clock: Clock,
                 run_blocking: RunBlocking, count_evictions: Callable[[Iterable[Eviction]], None],
                 retune: Retune | None) -> None:
        self.store = store
        self.gate = gate
        self.metrics = metrics
        self.clock = clock
        self.run_blocking = run_blocking
        self.count_evictions = count_evictions
        self.retune = retune
        self._was_open: bool | None = None

    async def run(self) -> None:
        retune_at: float | None = None
        expire_at = 0.0
        while True:
            if self.retune is not None and (retune_at is None or time.monotonic() >= retune_at):
                await self.retune(retune_at is None)
                retune_at = time.monotonic() + RETUNE_EVERY_S
            if time.monotonic() >= expire_at:  # a query in a thread: not at the gate's pace
                evicted = await self.run_blocking(self.store.expire, self.clock())
                self.count_evictions(evicted)
                expire_at = time.monotonic() + EXPIRE_EVERY_S
            self.metrics.quota_used.set(self.store.used_bytes)
            self._gate_gauge()
            await asyncio.sleep(TICK_S)

    def _gate_gauge(self) -> None:
        is_open = self.gate.is_open()
        self.metrics.gate_open.set(1 if is_open else 0)
        if is_open != self._was_open:
            state = self.gate.state()
            log_event(log, logging.INFO, "gate_open" if is_open else "gate_closed",
                      f"gate {'open' if is_open else 'closed'}", next_change=state.next_change)
            self._was_open = is_open
