"""The uplink's retry policy in-process: backoff, gate-aware pauses, errors counted by kind."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agent.config.settings import UplinkSettings, WindowSettings
from agent.errors import PermanentBackendError, TransientBackendError
from agent.obs.metrics import Metrics
from agent.uplink.gate import Gate
from agent.uplink.uplink import Uplink
from agent.windows.schedule import Schedule


def make_uplink(metrics: Metrics, gate: Gate) -> Uplink:
    settings = UplinkSettings(retry_initial_s=0.02, retry_max_s=0.1)

    async def run_blocking(fn: Any, *args: Any) -> Any:
        return fn(*args)

    return Uplink("site", None, None, gate, settings, run_blocking, metrics,  # type: ignore[arg-type]
                  time.time)


def errors(metrics: Metrics) -> dict[str, float]:
    return {s.labels["kind"]: s.value for m in metrics.registry.collect()
            if m.name == "skyferry_errors" for s in m.samples if s.name.endswith("_total")}


async def test_transient_errors_are_retried_counted_by_kind_and_wait_for_the_gate() -> None:
    metrics = Metrics()
    gate = Gate(Schedule(WindowSettings(), anchor=time.time()))
    uplink = make_uplink(metrics, gate)
    loop = asyncio.get_running_loop()
    attempts: list[tuple[int, bool, float]] = []

    async def flaky(n: int) -> str:
        attempts.append((n, gate.is_open(), time.monotonic()))
        if n == 1:
            raise TransientBackendError("503", "throttled")
        if n == 2:
            gate.set_link(False)  # loss of signal between two attempts
            loop.call_later(0.5, gate.set_link, True)
            raise TransientBackendError("reset", "connection")
        if n == 3:
            raise TransientBackendError("slow", "timeout")
        return "stored"

    assert await uplink.attempts.with_retries(flaky) == "stored"
    assert [a[0] for a in attempts] == [1, 2, 3, 4]
    assert all(is_open for _, is_open, _ in attempts), "no attempt while the gate is closed"
    assert attempts[2][2] - attempts[1][2] >= 0.5, "the retry waited for the gate to reopen"
    assert errors(metrics) == {"backend_throttled": 1, "backend_connection": 1,
                               "backend_timeout": 1}


async def test_permanent_errors_are_not_retried() -> None:
    metrics = Metrics()
    uplink = make_uplink(metrics, Gate(Schedule(WindowSettings(), anchor=time.time())))
    calls = 0

    async def refused(n: int) -> None:
        nonlocal calls
        calls += 1
        raise PermanentBackendError("403", "auth")

    with pytest.raises(PermanentBackendError):
        await uplink.attempts.with_retries(refused)
    assert calls == 1
    assert errors(metrics) == {"backend_auth": 1}
