"""The gate: open while a window is predicted (or configured `always`) and the link answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.windows import Contact
from agent.windows.schedule import Schedule

Clock = Callable[[], float]


@dataclass(frozen=True)
class GateState:
    open: bool
    window: Contact | None
    next_change: float | None
    paused: bool
    link_up: bool
    flushing: bool = False


class Gate:
    """Turns windows and link state into open/closed events the uplink waits on."""

    def __init__(self, schedule: Schedule, clock: Clock = time.time, tick_s: float = 0.25) -> None:
        self.schedule = schedule
        self.clock = clock
        self.tick_s = tick_s
        self.paused = False
        self.flushing = False  # operator's `flush`: open outside windows while the link is up
        self.link_up = True
        self._open = asyncio.Event()
        self._closed = asyncio.Event()
        self._changed = asyncio.Event()
        self.windows_opened = 0
        self.opened_at: float | None = None  # time.monotonic() when the gate last opened
        self._evaluate()

    def state(self) -> GateState:
        now = self.clock()
        window = self.schedule.window_at(now)
        return GateState(
            open=self._open.is_set(), window=window,
            next_change=self.schedule.next_change(now), paused=self.paused, link_up=self.link_up,
            flushing=self.flushing,
        )

    def is_open(self) -> bool:
        return self._open.is_set()

    def _evaluate(self) -> None:
        in_window = self.flushing or self.schedule.window_at(self.clock()) is not None
        should = in_window and self.link_up and not self.paused
        if should and not self._open.is_set():
            self.windows_opened += 1
            self.opened_at = time.monotonic()
            self._closed.clear()
            self._open.set()
        elif not should and not self._closed.is_set():
            self._open.clear()
            self._closed.set()

    def set_link(self, up: bool) -> None:
        self.link_up = up
        self._evaluate()

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        if paused:
            self.flushing = False
        self._evaluate()

    def set_schedule(self, schedule: Schedule) -> None:
        """New windows from a configuration reload (SIGHUP)."""
        self.schedule = schedule
        self._evaluate()

    def flush(self) -> bool:
        """Open now if the link is up, window or not, until `end_flush` or a pause."""
        self.paused = False
        self.flushing = True
        self._evaluate()
        return self.is_open()

    def end_flush(self) -> None:
        self.flushing = False
        self._evaluate()

    async def wait_open(self) -> None:
        await self._open.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def run(self) -> None:
        """Re-evaluate at each scheduled change (and at least every tick, for clock jumps)."""
        while True:
            now = self.clock()
            nxt = self.schedule.next_change(now)
            delay = self.tick_s if nxt is None else min(self.tick_s, max(0.0, nxt - now))
            await asyncio.sleep(delay)
            self._evaluate()
