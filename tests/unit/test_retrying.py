"""`retrying`: the first attempt is a plain call; what fails transiently is retried with the
same count and backoff as before the fast path; anything else is raised at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.backends.retry import retrying
from agent.errors import PermanentBackendError, TransientBackendError


class Flaky:
    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures, self.calls = failures, 0
        self.at: list[float] = []
        self.error = error or TransientBackendError("503 from the test", kind="throttled")

    async def __call__(self) -> str:
        self.calls += 1
        self.at.append(time.monotonic())
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_a_call_that_succeeds_is_made_once() -> None:
    f = Flaky(0)
    assert asyncio.run(retrying(f)) == "ok"
    assert f.calls == 1


def test_transient_failures_are_retried_with_backoff() -> None:
    f = Flaky(3)
    assert asyncio.run(retrying(f, attempts=6, initial_s=0.04, max_s=1.0)) == "ok"
    assert f.calls == 4
    waits = [b - a for a, b in zip(f.at, f.at[1:], strict=False)]
    # equal jitter: between half and all of initial * 2^n (n = 0, 1, 2)
    for n, w in enumerate(waits):
        assert 0.02 * 2**n * 0.9 <= w <= 0.04 * 2**n + 0.05, (n, waits)


def test_attempts_bound_the_calls_and_the_last_error_is_raised() -> None:
    f = Flaky(10)
    with pytest.raises(TransientBackendError, match="503 from the test"):
        asyncio.run(retrying(f, attempts=3, initial_s=0.01, max_s=0.02))
    assert f.calls == 3
    one = Flaky(10)
    with pytest.raises(TransientBackendError):
        asyncio.run(retrying(one, attempts=1))
    assert one.calls == 1


def test_other_errors_are_not_retried() -> None:
    f = Flaky(10, PermanentBackendError("403 from the test"))
    with pytest.raises(PermanentBackendError):
        asyncio.run(retrying(f))
    assert f.calls == 1
