"""agent.uplink.ratelimit: the token bucket shared by upload streams."""

from __future__ import annotations

import asyncio
import time

from agent.uplink.ratelimit import TokenBucket

RATE = 400_000.0  # bytes per second
PIECE = 16_000


async def send(bucket: TokenBucket, total: int, piece: int = PIECE) -> None:
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        await bucket.acquire(n)
        sent += n


async def test_rate_is_honoured_over_a_second() -> None:
    bucket = TokenBucket(RATE)
    # The bucket starts full (a quarter second of burst): one second of data beyond it.
    total = int(bucket.burst + RATE * 1.0)
    t0 = time.monotonic()
    await send(bucket, total)
    elapsed = time.monotonic() - t0
    assert 0.85 <= elapsed <= 1.6, elapsed


async def test_streams_share_one_rate() -> None:
    bucket = TokenBucket(RATE)
    per_stream = int((bucket.burst + RATE * 0.5) / 4)
    t0 = time.monotonic()
    await asyncio.gather(*(send(bucket, per_stream) for _ in range(4)))
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed <= 1.0, elapsed


async def test_request_larger_than_burst_goes_into_debt() -> None:
    bucket = TokenBucket(RATE)
    t0 = time.monotonic()
    await bucket.acquire(int(bucket.burst + RATE * 0.2))  # waits ~0.2 s itself
    first = time.monotonic() - t0
    await bucket.acquire(int(RATE * 0.1))  # no tokens left: ~0.1 s more
    total = time.monotonic() - t0
    assert 0.17 <= first <= 0.45, first
    assert 0.27 <= total <= 0.6, total


async def test_none_is_unlimited() -> None:
    bucket = TokenBucket(None)
    t0 = time.monotonic()
    for _ in range(1000):
        await bucket.acquire(1 << 30)
    assert time.monotonic() - t0 < 0.2


async def test_set_rate_lifts_and_applies_a_limit() -> None:
    bucket = TokenBucket(RATE / 100)  # 4 kB/s: 1 MB would take minutes
    bucket.set_rate(None)
    t0 = time.monotonic()
    await bucket.acquire(1 << 20)
    assert time.monotonic() - t0 < 0.1
    bucket.set_rate(RATE)
    assert bucket.burst == RATE * 0.25
    t0 = time.monotonic()
    await send(bucket, int(bucket.burst + RATE * 0.2))
    assert time.monotonic() - t0 >= 0.17
