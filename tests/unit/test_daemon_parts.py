"""The daemon's own parts in-process: the executors (agent/host/blocking.py), named tasks, and
the ingest accounting (agent/daemon/intake.py), without a store or a site."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.daemon.intake import Intake
from agent.daemon.tasks import TaskSet
from agent.errors import DiskFullError, QuotaExceededError
from agent.host.blocking import Executors
from agent.obs.metrics import Metrics
from agent.store.store import Eviction


async def test_blocking_work_runs_off_the_loop_in_the_daemons_threads() -> None:
    with Executors(io_workers=1) as ex:
        io = await ex.policy.run(lambda: threading.current_thread().name)
        answer = await ex.policy.answer(lambda: threading.current_thread().name)
    assert io.startswith("skyferry-io") and answer.startswith("skyferry-answer")


async def test_an_answer_does_not_wait_behind_busy_io_threads() -> None:
    release = threading.Event()
    with Executors(io_workers=1) as ex:
        busy = asyncio.ensure_future(ex.policy.run(release.wait, 5.0))
        assert await asyncio.wait_for(ex.policy.answer(lambda: 42), 2.0) == 42
        release.set()
        assert await busy is True


def test_a_stopped_server_thread_is_joined_on_close() -> None:
    stop = threading.Event()

    def serve_forever() -> None:
        stop.wait(5.0)

    with Executors() as ex:
        ex.policy.serve("skyferry-test", serve_forever)
        names = [t.name for t in threading.enumerate()]
        stop.set()
    assert "skyferry-test" in names
    assert "skyferry-test" not in [t.name for t in threading.enumerate()]


async def test_a_named_task_is_cancelled_and_replaced() -> None:
    tasks = TaskSet()
    started: list[str] = []

    async def job(name: str) -> None:
        started.append(name)
        await asyncio.sleep(3600)

    async with asyncio.TaskGroup() as tg:
        tasks.bind(tg)
        tasks.spawn("a", job("a1"))
        await asyncio.sleep(0)
        await tasks.cancel("a")
        tasks.spawn("a", job("a2"))
        await asyncio.sleep(0)
        tasks.cancel_all()
    assert started == ["a1", "a2"]


@dataclass
class _Result:
    evicted: tuple[Eviction, ...] = ()
    duplicate_of: str | None = None
    size: int = 100
    stored_bytes: int = 40
    chunks: int = 3
    new_chunks: int = 1


@dataclass
class _Pipeline:
    fail: Exception | None = None
    result: _Result = field(default_factory=_Result)

    def ingest_file(self, req: Any) -> _Result:
        if self.fail is not None:
            raise self.fail
        return self.result


async def _inline(fn: Any, *args: Any) -> Any:
    return fn(*args)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@dataclass
class _Req:
    priority: str = "normal"


async def test_an_ingest_is_counted_and_wakes_the_uplink() -> None:
    metrics, woken = Metrics(), []
    ev = Eviction(object_id="old", priority="bulk", size=9, reason="quota")
    pipeline = _Pipeline(result=_Result(evicted=(ev,)))
    intake = Intake(pipeline, _inline, metrics, lambda: woken.append(1), None)  # type: ignore[arg-type]
    await intake.ingest(_Req())  # type: ignore[arg-type]
    assert woken == [1]
    assert _value(metrics, "skyferry_ingested_bytes_total", **{"class": "normal"}) == 100
    assert _value(metrics, "skyferry_stored_bytes_total", **{"class": "normal"}) == 40
    assert _value(metrics, "skyferry_dedup_chunks_total") == 2
    assert _value(metrics, "skyferry_evictions_total", **{"class": "bulk", "reason": "quota"}) == 1


@pytest.mark.parametrize(("error", "disk_full"), [(QuotaExceededError("full"), 0),
                                                  (DiskFullError("disk"), 1)])
async def test_a_refusal_is_counted_then_raised(error: Exception, disk_full: int) -> None:
    metrics = Metrics()
    intake = Intake(_Pipeline(fail=error), _inline, metrics, lambda: None, None)  # type: ignore[arg-type]
    with pytest.raises(QuotaExceededError):
        await intake.ingest(_Req())  # type: ignore[arg-type]
    assert _value(metrics, "skyferry_quota_refusals_total", **{"class": "normal"}) == 1
    assert _value(metrics, "skyferry_errors_total", kind="disk_full") == disk_full
