"""Event-driven spools (issue 17): a file renamed in is taken at once, one written in place
`settle` after its writer closed it, neither waiting for the next scan, through the same careful
path as a scan (links never followed, temporary names and files still open left alone); where
inotify cannot serve, one line and the periodic scan as before. And the uplink's wake-up that
is never lost."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.config.settings import SpoolSettings
from agent.ingest.requests import IngestRequest, IngestResult
from agent.sources import spool_watch
from agent.sources.spool import SpoolSource
from agent.uplink.wakeup import Wakeup

SLOW = 60.0  # the scan interval: only an inotify event can make a file be taken soon
SETTLE = 0.5


class Taken:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.bytes: dict[str, bytes] = {}

    async def ingest(self, req: IngestRequest) -> IngestResult:
        assert req.opener is not None
        fd = req.opener()
        try:
            self.bytes[req.name] = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        self.names.append(req.name)
        return IngestResult(f"obj-{len(self.names)}", 0, 0, 0, 0)


@asynccontextmanager
async def running(path: Path, settle: float = SETTLE, interval: float = SLOW,
                  gather: float = 0.0) -> AsyncIterator[tuple[SpoolSource, Taken]]:
    taken = Taken()
    source = SpoolSource(SpoolSettings(name="s", path=path, settle_s=settle,
                                       scan_interval_s=interval), taken.ingest, gather_s=gather)
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(0.3)  # the first scan has run and the watches are set
        yield source, taken
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def test_a_finished_file_is_taken_at_once_and_a_new_folder_is_watched(
        tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    settle = 2.0  # far longer than "at once", even on a loaded machine
    async with running(spool, settle=settle) as (source, taken):
        (spool / ".a.tmp").write_bytes(b"renamed in")
        os.rename(spool / ".a.tmp", spool / "a.txt")
        assert await until(lambda: "a.txt" in taken.names) < settle
        (spool / "b.txt").write_bytes(b"written in place, then closed")  # IN_CLOSE_WRITE
        took = await until(lambda: "b.txt" in taken.names)
        assert settle * 0.9 <= took < SLOW / 4  # its settle time, not the next scan
        (spool / "sub").mkdir()  # heard: watched from the scan it triggers
        await asyncio.sleep(0.3)
        (spool / "sub" / ".c.part").write_bytes(b"in a new folder")
        os.rename(spool / "sub" / ".c.part", spool / "sub" / "c.txt")
        await until(lambda: "sub/c.txt" in taken.names)
        assert source._watch is not None
        # Each deleted once accepted: the deletion follows the take, so the source runs until
        # it is done (stopped in between, a fresh clone under load found c.txt still there).
        await until(lambda: not any(p.is_file() for p in spool.rglob("*")))
    assert taken.bytes == {"a.txt": b"renamed in", "b.txt": b"written in place, then closed",
                           "sub/c.txt": b"in a new folder"}
    assert not any(p.is_file() for p in spool.rglob("*"))  # each accepted, then deleted


async def test_what_an_event_names_is_looked_at_as_a_scan_would(tmp_path: Path) -> None:
    spool, outside = tmp_path / "spool", tmp_path / "outside"
    spool.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"not the spool's")
    async with running(spool) as (_, taken):
        os.symlink(outside / "secret", spool / ".link.tmp")
        os.rename(spool / ".link.tmp", spool / "link")  # a link renamed in: never followed
        with open(spool / "open.log", "wb") as f:  # still open: not finished, not taken
            f.write(b"first half")
            f.flush()
            (spool / "later.txt").write_bytes(b"taken")
            await until(lambda: "later.txt" in taken.names)
            await asyncio.sleep(0.2)
            assert taken.names == ["later.txt"]
            f.write(b", second half")
        await until(lambda: "open.log" in taken.names)  # its close is the event
    assert taken.bytes["open.log"] == b"first half, second half"
    assert (spool / "link").is_symlink() and (outside / "secret").read_bytes() == b"not the spool's"


async def test_without_inotify_one_line_and_the_periodic_scan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(spool_watch, "remote_fs", lambda path: "nfs4")
    with caplog.at_level(logging.INFO, logger="skyferry.spool"):
        async with running(spool, settle=0.0, interval=0.05) as (source, taken):
            assert source._watch is None
            (spool / "a.txt").write_bytes(b"found by the scan")
            await until(lambda: "a.txt" in taken.names)
    lines = [r for r in caplog.records if getattr(r, "event", "") == "spool_unwatched"]
    assert len(lines) == 1 and "nfs4" in lines[0].getMessage()


def test_remote_file_systems_are_told_from_local_ones(tmp_path: Path) -> None:
    assert spool_watch.remote_fs(str(tmp_path)) is None


async def test_a_wake_up_during_an_empty_claim_is_not_lost() -> None:
    wake = Wakeup()
    seen = wake.seq
    wake.notify()  # work queued while the worker's claim ran and found nothing
    start = time.monotonic()
    await wake.wait(seen, timeout=5.0)
    assert time.monotonic() - start < 0.1
    seen = wake.seq
    waiter = asyncio.create_task(wake.wait(seen, timeout=5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    wake.notify()
    await asyncio.wait_for(waiter, 1.0)
    start = time.monotonic()
    await wake.wait(wake.seq, timeout=0.1)  # nothing new: the safety-net poll
    assert time.monotonic() - start >= 0.09


async def test_a_burst_into_a_spool_that_gathers_is_taken_together(tmp_path: Path) -> None:
    """Below the most urgent class, files renamed in within `settle` of the first are taken in
    one pass (one pack with packing on), `settle` after the first, not at the next scan."""
    spool = tmp_path / "spool"
    spool.mkdir()
    passes: list[set[str]] = []
    async with running(spool, gather=SETTLE) as (source, taken):
        real = source.take_named

        async def take_named(names: set[str]) -> None:
            passes.append(set(names))
            await real(names)

        source.take_named = take_named  # type: ignore[method-assign]
        start = time.monotonic()
        for i in range(5):
            (spool / f".f{i}.tmp").write_bytes(b"x")
            os.rename(spool / f".f{i}.tmp", spool / f"f{i}")
            await asyncio.sleep(0.02)
        await until(lambda: len(taken.names) == 5)
        assert SETTLE * 0.9 <= time.monotonic() - start < SLOW / 4
    assert passes == [{f"f{i}" for i in range(5)}]
