"""The site's heartbeat (agent/uplink/heartbeat.py) in-process, on a real store, a real folder
backend and real keys: what it says, how the forecast is scored, and that a heartbeat stuck on
its PUT holds no data back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.backends.protocol import Backend
from agent.backends.registry import open_backend
from agent.config.settings import (
    ChunkingSettings,
    CycleWindow,
    UplinkSettings,
    WindowSettings,
)
from agent.format.heartbeat import open_heartbeat
from agent.obs.metrics import Metrics
from agent.uplink.gate import Gate
from agent.uplink.uplink import Uplink
from agent.windows.schedule import Schedule
from tests.kits.pipeline import Env, Keys, pipeline_env, site_keys

SITE = "beat-site"
CHUNKING = ChunkingSettings(min_size=4 << 10, avg_size=16 << 10, max_size=64 << 10)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return site_keys(tmp_path_factory.mktemp("keys"), SITE)


@pytest.fixture
def env(tmp_path: Path, keys: Keys) -> Iterator[Env]:
    with pipeline_env(tmp_path, SITE, keys, CHUNKING) as e:
        yield e


async def inline(fn: Any, *args: Any) -> Any:
    return fn(*args)


def uplink_for(env: Env, backend: Backend, metrics: Metrics, gate: Gate | None = None) -> Uplink:
    gate = gate or Gate(Schedule(WindowSettings(), anchor=time.time()))
    settings = UplinkSettings(streams=2, retry_initial_s=0.02, retry_max_s=0.1)
    return Uplink(SITE, env.store, backend, gate, settings, inline, metrics, time.time,
                  keys=env.keys.edge)


async def test_a_heartbeat_is_signed_and_says_queue_errors_since_the_last_and_its_seq(
        env: Env, tmp_path: Path) -> None:
    cloud = tmp_path / "cloud"
    metrics = Metrics()
    uplink = uplink_for(env, open_backend(f"file://{cloud}"), metrics)
    env.ingest("queued.bin", b"q" * 50_000, priority="bulk")
    metrics.errors.labels("backend_timeout").inc(2)
    assert uplink.heartbeat is not None
    first = await uplink.heartbeat.send()
    metrics.errors.labels("spool_vanished").inc()
    second = await uplink.heartbeat.send()
    assert first is not None and second is not None
    opened = [open_heartbeat(hb.key, (cloud / hb.key).read_bytes(), env.keys.recipient,
                             env.keys.verify) for hb in (first, second)]
    assert opened == [first, second]
    assert (first.seq, second.seq) == (1, 2)
    assert first.queue["bulk"].objects == 1 and first.queue["bulk"].bytes > 0
    assert first.oldest_queued_age_s is not None and first.queued_objects == 1
    assert first.errors == 2 and first.errors_by_kind == {"backend_timeout": 2}
    assert second.errors == 1 and second.errors_by_kind == {"spool_vanished": 1}
    assert first.forecast.basis == "always" and first.forecast.hit_ratio is None
    assert first.disk_free_bytes > 0 and first.software
    assert first.key.startswith(f"{SITE}/heartbeats/")


def test_the_forecast_is_scored_by_the_windows_the_link_came_up_in() -> None:
    now = [1000.0]
    schedule = Schedule(WindowSettings(mode="schedule", cycle=CycleWindow(10.0, 10.0)),
                        anchor=1000.0)
    gate = Gate(schedule, clock=lambda: now[0])
    from agent.uplink.heartbeat import WindowTally

    tally = WindowTally(gate)
    assert tally.forecast(None).basis is None, "no window seen yet: nothing to claim"
    for t, link in ((1001, True), (1005, True), (1015, True), (1021, False), (1025, False),
                    (1041, False), (1045, True)):
        now[0] = t
        gate.set_link(link)
        tally.observe(t)
    forecast = tally.forecast(None)
    assert (forecast.windows_predicted, forecast.windows_link_up) == (3, 2)
    assert forecast.hit_ratio == pytest.approx(2 / 3) and forecast.basis == "windows"
    learned = tally.forecast(0.9)
    assert learned.hit_ratio == 0.9 and learned.basis == "learned"


class StuckHeartbeats:
    """The real folder backend, except that a heartbeat's PUT hangs until released: a request
    stuck on a dying link."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.release = asyncio.Event()
        self.stuck = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_if_absent(self, key: str, data: bytes, probe_first: bool = False) -> bool:
        if "/heartbeats/" in key:
            self.stuck += 1
            await self.release.wait()
        return await self.inner.put_if_absent(key, data, probe_first)


async def test_a_stuck_heartbeat_holds_no_data_back(env: Env, tmp_path: Path) -> None:
    cloud = tmp_path / "cloud"
    backend = StuckHeartbeats(open_backend(f"file://{cloud}"))
    uplink = uplink_for(env, backend, Metrics())  # type: ignore[arg-type]
    result = env.ingest("data.bin", b"d" * 200_000)
    run = asyncio.create_task(uplink.run())
    try:
        async with asyncio.timeout(10):
            while not list((cloud / SITE / "manifests").rglob(result.object_id)):
                await asyncio.sleep(0.02)
        assert backend.stuck == 1, "the heartbeat was on its way, and stuck"
        assert not (cloud / SITE / "heartbeats").exists()
        assert list((cloud / SITE / "manifests").rglob("*"))
        backend.release.set()
        async with asyncio.timeout(10):
            while not list((cloud / SITE / "heartbeats").rglob("*-1")):
                await asyncio.sleep(0.02)
    finally:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
