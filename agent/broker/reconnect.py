"""Reconnect with backoff: the loop each broker connection (MQTT in, MQTT status) runs.

aiomqtt does not reconnect by itself: a connection that fails or drops raises, and the caller
connects again. Both MQTT connections do that the same way, so it is written once, here.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, retry_if_result

from agent.backends.retry import backoff


async def keep_connected(session: Callable[[], Awaitable[None]], stop: asyncio.Event,
                         initial_s: float, max_s: float,
                         on_lost: Callable[[Exception], None],
                         stable_s: float | None = None) -> None:
    """Run `session` again and again until `stop` is set; returns once it is.

    `session` connects and serves; it returns once `stop` is set, or raises. After it raises,
    `on_lost(error)` is called and the next session waits a backoff (initial_s doubling up to
    max_s, between half and all of it at random, so sites do not all reconnect at once after a
    broker restart) that setting `stop` cuts short. A session that lasted `stable_s` (default
    max_s) or more was a working connection: the backoff after it starts again from
    initial_s, so a drop after hours connected is not retried as slowly as the tenth refusal
    in a row. Cancellation is never retried: it propagates, as shutdown expects.
    """
    loop = asyncio.get_running_loop()
    healthy_after = max_s if stable_s is None else stable_s
    grow = backoff(initial_s, max_s)
    ran_s = 0.0  # how long the last session lasted
    first = 1  # the attempt that began the current run of failures

    async def attempt() -> bool:
        nonlocal ran_s
        if not stop.is_set():
            started = loop.time()
            try:
                await session()
            finally:
                ran_s = loop.time() - started
        return stop.is_set()

    def wait(state: RetryCallState) -> float:
        nonlocal first
        if ran_s >= healthy_after:
            first = state.attempt_number
        counted = copy.copy(state)
        counted.attempt_number = state.attempt_number - first + 1
        return float(grow(counted))

    def lost(state: RetryCallState) -> None:
        if state.outcome is not None and state.outcome.failed:
            error = state.outcome.exception()
            if isinstance(error, Exception):
                on_lost(error)

    await AsyncRetrying(
        # CancelledError is not an Exception: shutdown is never retried. A session that
        # returned with `stop` unset is run again after the backoff too, never in a tight loop.
        retry=retry_if_exception_type(Exception) | retry_if_result(lambda done: not done),
        wait=wait,
        stop=lambda _state: stop.is_set(),
        after=lost,
        sleep=lambda seconds: _pause(stop, seconds),
        retry_error_callback=lambda _state: True,  # stopped after a failure: just return
    )(attempt)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
