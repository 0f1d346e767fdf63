"""The retry policy for backend calls: which failures are retried, and how long to wait."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from agent.errors import TransientBackendError

T = TypeVar("T")


def is_transient(e: BaseException) -> bool:
    return isinstance(e, TransientBackendError)


def backoff(initial_s: float, max_s: float) -> wait_base:
    """Exponential backoff with "equal jitter": between half and all of initial * 2^n, capped.

    The random half keeps parallel streams that failed together from retrying in lockstep;
    the fixed half keeps a throttled service from being asked again almost at once.
    """
    half, cap = initial_s / 2, max_s / 2
    return wait_exponential(multiplier=half, max=cap) + wait_random_exponential(
        multiplier=half, max=cap)


async def retrying(fn: Callable[[], Awaitable[T]], attempts: int = 6, initial_s: float = 0.5,
                   max_s: float = 10.0) -> T:
    """Retry transient backend errors with exponential backoff and jitter (restore, verify).

    The first attempt is a plain call: most calls succeed at once, and setting up tenacity's
    machinery costs more than a folder backend's call itself (about 40 µs of the event loop's
    thread, thousands of times per landing pass).
    """
    try:
        return await fn()
    except TransientBackendError as e:
        first: TransientBackendError | None = e
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=backoff(initial_s, max_s),
        stop=stop_after_attempt(attempts),
        reraise=True,
    ):
        with attempt:
            if first is not None:  # attempt 1, already made: tenacity counts it and waits
                failed, first = first, None
                raise failed
            return await fn()
    raise AssertionError("unreachable")
