"""A token bucket shared by all upload streams."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Admits bytes at `rate` per second on average, with bursts up to `burst` bytes."""

    def __init__(self, rate_bps: float | None, burst: float | None = None) -> None:
        self.rate = rate_bps
        self.burst = burst if burst is not None else (rate_bps or 0.0) * 0.25
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def set_rate(self, rate_bps: float | None) -> None:
        self.rate = rate_bps
        self.burst = (rate_bps or 0.0) * 0.25

    async def acquire(self, nbytes: int) -> None:
        """Wait until `nbytes` may be sent; larger-than-burst requests go into debt."""
        if not self.rate:
            return
        async with self._lock:  # first come, first served across streams
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
