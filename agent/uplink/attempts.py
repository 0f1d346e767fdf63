"""How the uplink's requests are tried: transient failures retried with backoff, never while
the gate is closed, and small requests repeated rather than held open through a lost link."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_never

from agent.backends.retry import backoff, is_transient
from agent.config.settings import UplinkSettings
from agent.errors import BackendError
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.uplink.gate import Gate

T = TypeVar("T")
log = logging.getLogger("skyferry.uplink")


class Attempts:
    """`on_success` hears of each request that went through (a refusal may have ended)."""

    def __init__(self, gate: Gate, settings: UplinkSettings, metrics: Metrics,
                 on_success: Callable[[], None]) -> None:
        self.gate = gate
        self.settings = settings
        self.metrics = metrics
        self._on_success = on_success

    async def _gate_aware_sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        # If the window closed meanwhile, wait for the next one instead of spending an attempt
        # against a dead link. (A closing gate also cancels the upload outright; this covers
        # the moment between the close and that cancellation.)
        await self.gate.wait_open()

    async def with_retries(self, fn: Callable[[int], Awaitable[T]]) -> T:
        """Retry transient failures (timeouts, resets, 5xx, 429) with backoff and jitter.

        No attempt limit: giving up would only put the chunk back in line and restart the
        backoff from its shortest delay: more requests against a struggling service, not
        fewer. The chunk leaves this loop on success, on a permanent error, or when the gate
        closes and cancels it. obstore's Retry-After is not visible to us (it drops response
        headers), so throttling gets the same capped exponential backoff.
        """
        attempts = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=backoff(self.settings.retry_initial_s, self.settings.retry_max_s),
            stop=stop_never,
            sleep=self._gate_aware_sleep,
            reraise=True,
        )
        async for attempt in attempts:
            with attempt:
                try:
                    result = await fn(attempt.retry_state.attempt_number)
                except BackendError as e:
                    self.metrics.errors.labels(f"backend_{e.kind}").inc()
                    if is_transient(e):
                        log_event(log, logging.DEBUG, "upload_retry", str(e), kind=e.kind,
                                  attempt=attempt.retry_state.attempt_number)
                    raise
                self._on_success()
                return result
        raise AssertionError("unreachable")

    async def while_open(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a small request; if the gate closes first, run it again once it reopens.

        For requests cheaper to repeat than to wait for: one held open through a black hole
        would wait out TCP's backoff, or the backend's whole deadline.
        """
        while True:
            await self.gate.wait_open()
            task = asyncio.ensure_future(fn())
            closed = asyncio.ensure_future(self.gate.wait_closed())
            try:
                await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if not task.cancelled():
                return task.result()
