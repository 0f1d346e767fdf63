"""How idle upload workers learn of new work at once, without a lost wake-up.

A worker notes `seq` before it claims; if the claim found nothing and `notify` was called
meanwhile (an object committed while the claim ran in its thread), `wait` returns at once.
A plain Event cleared after an empty claim lost exactly that wake-up, and the worker slept
through its poll interval with work queued.
"""

from __future__ import annotations

import asyncio
import contextlib

from agent.uplink.gate import Gate

IDLE_POLL_S = 5.0  # an idle worker looks again this often all the same (the safety net)


class Wakeup:
    """Event-loop only: `notify` from the loop's thread."""

    def __init__(self) -> None:
        self.seq = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.seq += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, since: int, timeout: float = IDLE_POLL_S) -> None:
        """Until `notify` is called after `seq` was `since` (at once if it was already), or
        `timeout` seconds."""
        if self.seq != since:
            return
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
        # that arrives just as the event fires (shutdown would hang).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()


async def wake_at_openings(gate: Gate, wakeup: Wakeup) -> None:
    """Idle workers look again the moment the gate opens: what did not fit the last window's
    budget may fit the new one (else they would wait for the slow poll)."""
    while True:
        await gate.wait_closed()
        await gate.wait_open()
        wakeup.notify()
