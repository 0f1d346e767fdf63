"""agent.uplink.gate: open while a window is predicted and the link answers and nobody paused it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from agent.config.settings import CycleWindow, WindowSettings
from agent.uplink.gate import Gate
from agent.windows import Contact
from agent.windows.schedule import Schedule

ANCHOR = 1_000_000.0
OPEN_S, CLOSED_S = 10.0, 20.0  # window [ANCHOR, ANCHOR+10), closed until ANCHOR+30, ...


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cycle(open_s: float = OPEN_S, closed_s: float = CLOSED_S,
          anchor: float = ANCHOR) -> Schedule:
    return Schedule(WindowSettings(mode="schedule", cycle=CycleWindow(open_s, closed_s)), anchor)


@asynccontextmanager
async def running(gate: Gate) -> AsyncIterator[Gate]:
    task = asyncio.create_task(gate.run())
    try:
        yield gate
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def settles(cond: Callable[[], bool], timeout: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.005)
    return cond()


async def test_opens_and_closes_at_schedule_changes() -> None:
    clock = FakeClock(ANCHOR + 1)
    gate = Gate(cycle(), clock, tick_s=0.01)
    assert gate.is_open() and gate.windows_opened == 1
    st = gate.state()
    assert st.open and st.window == Contact(ANCHOR, ANCHOR + OPEN_S, None, "cycle")
    assert st.next_change == ANCHOR + OPEN_S and st.link_up and not st.paused

    async with running(gate):
        clock.now = ANCHOR + OPEN_S - 0.001  # still inside: nothing changes
        await asyncio.sleep(0.05)
        assert gate.is_open()

        clock.now = ANCHOR + OPEN_S  # the end is exclusive
        await asyncio.wait_for(gate.wait_closed(), 1.0)
        assert not gate.is_open()
        st = gate.state()
        assert not st.open and st.window is None and st.next_change == ANCHOR + 30

        clock.now = ANCHOR + 30  # the start is inclusive
        await asyncio.wait_for(gate.wait_open(), 1.0)
        assert gate.windows_opened == 2
        assert gate.state().window == Contact(ANCHOR + 30, ANCHOR + 40, None, "cycle")

        clock.now = ANCHOR + 1000 * 30 + 15  # a jump far ahead, into a closed phase
        await asyncio.wait_for(gate.wait_closed(), 1.0)
        assert gate.windows_opened == 2


async def test_run_wakes_at_the_change_not_at_the_tick() -> None:
    """With a long tick, the gate still flips on time because it sleeps until next_change."""
    start = time.time()
    gate = Gate(cycle(open_s=0.3, closed_s=0.3, anchor=start), time.time, tick_s=30)
    assert gate.is_open()
    async with running(gate):
        await asyncio.wait_for(gate.wait_closed(), 1.0)
        closed_at = time.time() - start
        await asyncio.wait_for(gate.wait_open(), 1.0)
        opened_at = time.time() - start
    assert 0.3 <= closed_at < 0.55, closed_at
    assert 0.6 <= opened_at < 0.85, opened_at
    assert gate.windows_opened == 2


async def test_link_down_closes_at_once_and_keeps_it_closed() -> None:
    clock = FakeClock(ANCHOR + 1)
    gate = Gate(cycle(), clock, tick_s=0.01)
    assert gate.is_open()
    gate.set_link(False)  # no run(): loss of signal acts immediately
    assert not gate.is_open()
    await asyncio.wait_for(gate.wait_closed(), 0.1)
    assert not gate.state().link_up

    async with running(gate):
        clock.now = ANCHOR + 30  # a window opens, but the link is still down
        await asyncio.sleep(0.05)
        assert not gate.is_open()
        gate.set_link(True)
        assert gate.is_open()
        assert gate.windows_opened == 2


async def test_pause_closes_and_resume_reopens_only_when_everything_allows() -> None:
    clock = FakeClock(ANCHOR + 1)
    gate = Gate(cycle(), clock)
    gate.set_paused(True)
    assert not gate.is_open() and gate.state().paused
    gate.set_link(False)
    gate.set_paused(False)
    assert not gate.is_open()  # the link is still down
    gate.set_link(True)
    assert gate.is_open()
    clock.now = ANCHOR + 15
    gate.set_paused(True)
    gate.set_paused(False)
    assert not gate.is_open()  # resumed outside a window: stays closed
    assert gate.windows_opened == 2


async def test_wait_open_and_wait_closed_block_until_the_change() -> None:
    clock = FakeClock(ANCHOR + 15)  # closed phase
    gate = Gate(cycle(), clock, tick_s=0.01)
    assert not gate.is_open() and gate.windows_opened == 0
    await asyncio.wait_for(gate.wait_closed(), 0.1)  # already closed: returns at once

    waiter = asyncio.create_task(gate.wait_open())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    async with running(gate):
        clock.now = ANCHOR + 30
        await asyncio.wait_for(waiter, 1.0)

        closing = asyncio.create_task(gate.wait_closed())
        await asyncio.sleep(0.05)
        assert not closing.done()
        gate.set_link(False)
        await asyncio.wait_for(closing, 0.1)
    assert await settles(lambda: not gate.is_open())


async def test_always_mode_is_open_until_the_link_drops() -> None:
    gate = Gate(Schedule(WindowSettings(mode="always"), 0.0), FakeClock(5.0))
    st = gate.state()
    assert st.open and st.next_change is None and st.window is not None
    gate.set_link(False)
    assert not gate.is_open()
