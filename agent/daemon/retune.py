"""`level = "auto"`: the zstd level chosen again from the backlog and the link budget
(the policy itself is agent/ingest/compression_policy.py; this feeds it and reports its choice)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from agent.host.blocking import RunBlocking
from agent.ingest.compression_policy import HORIZON_S, AutoLevel, LevelSink
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.uplink.gate import Clock

log = logging.getLogger("skyferry.daemon")
LINK_BUDGET_EVERY_S = 30.0  # how often the next 24 h's link budget is redone

LinkBudget = Callable[[float, float], "int | None"]  # (now, horizon_s) -> bytes; blocking


def auto_level(compressor: LevelSink, sealers_per_spool: int, spools: int) -> AutoLevel:
    """The policy for this host: its CPUs, and how many objects the spools seal at once."""
    cpus = len(os.sched_getaffinity(0))
    return AutoLevel(compressor, cpus, min(cpus, sealers_per_spool * max(1, spools)))


class CompressionRetune:
    def __init__(self, auto: AutoLevel, *, link_budget: LinkBudget,
                 waiting_bytes: Callable[[], int], used_bytes: Callable[[], int],
                 run_blocking: RunBlocking, metrics: Metrics, clock: Clock) -> None:
        self.auto = auto
        self.link_budget = link_budget
        self.waiting_bytes = waiting_bytes  # settled in the spools, not yet ingested
        self.used_bytes = used_bytes  # the store's
        self.run_blocking = run_blocking
        self.metrics = metrics
        self.clock = clock
        self._budget: tuple[float, int | None] | None = None  # (when, bytes)

    async def __call__(self, first: bool) -> None:
        """Choose the level again; the first call always reports the level."""
        now = self.clock()
        if self._budget is None or abs(now - self._budget[0]) >= LINK_BUDGET_EVERY_S:
            try:
                budget: int | None = await self.run_blocking(self.link_budget, now, HORIZON_S)
            except Exception as e:  # a forecast problem must not stop housekeeping
                log_event(log, logging.WARNING, "link_budget_failed",
                          f"could not predict the link budget, keeping the last one: {e}")
                budget = None if self._budget is None else self._budget[1]
            self._budget = (now, budget)
        if self.auto.update(self.used_bytes(), self.waiting_bytes(), self._budget[1]) or first:
            c = self.auto.choice
            self.metrics.compression_level.set(c.level)
            self.metrics.compression_long_distance.set(1 if c.long_distance else 0)
            log_event(log, logging.INFO, "compression_level",
                      f"compression level {c.level}: {c.reason}", zstd_level=c.level,
                      long_distance=c.long_distance, regime=c.regime)
