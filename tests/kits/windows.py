"""In-process daemons for the window tests: a clock the test moves, and the log as a record.
The site's config tables are the ones tests/kits/site.py writes for a subprocess daemon.

Everything is real (Store, Pipeline, Uplink, Gate, the local backend, the link monitor); only
time is under the test's control. `JumpClock` runs at the speed of real time, so rate limits,
measured throughput and timeouts behave as they do in production, but the test can jump it
to just before a window instead of waiting for one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.settings import Settings
from agent.daemon.site_config import validate
from agent.daemon.wiring import Daemon
from agent.format.keys import generate_keys
from agent.ingest.requests import IngestRequest
from tests.kits.site import site_tables

SMALL_CHUNKS = {"min_size": "64KiB", "avg_size": "256KiB", "max_size": "1MiB"}


class JumpClock:
    """Unix time that advances with the monotonic clock and can be jumped forward."""

    def __init__(self, start: float) -> None:
        self._base = start - time.monotonic()

    def __call__(self) -> float:
        return self._base + time.monotonic()

    def jump_to(self, t: float) -> None:
        self._base = t - time.monotonic()


@dataclass
class Event:
    at: float  # the test clock when it was logged
    name: str
    fields: dict[str, Any]


class EventLog(logging.Handler):
    """Every `log_event` line, stamped with the test clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(logging.DEBUG)
        self.clock = clock
        self.events: list[Event] = []

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "event", None)
        if name is not None:
            self.events.append(Event(self.clock(), name, dict(record.__dict__)))

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]


def site_settings(root: Path, windows: dict[str, Any], uplink: dict[str, Any] | None = None,
                  site_id: str = "win-test") -> Settings:
    keys = generate_keys(root / "keys", site_id)
    data = {
        **site_tables(root, site_id, keys, {"url": f"file://{root / 'cloud'}"}),
        "chunking": SMALL_CHUNKS,
        "uplink": uplink or {},
        "windows": windows,
        "telemetry": {"log_level": "debug"},
    }
    return validate(data, root / "skyferry.toml")


class RunningDaemon:
    """A Daemon on this event loop, with its log captured against the test clock."""

    def __init__(self, settings: Settings, clock: JumpClock) -> None:
        self.settings = settings
        self.clock = clock
        self.log = EventLog(clock)
        self.logger = logging.getLogger("skyferry")
        self.logger.addHandler(self.log)
        self._old_level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.daemon = Daemon(settings, clock=clock)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunningDaemon:
        self.task = asyncio.create_task(self.daemon.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)
        self.logger.removeHandler(self.log)
        self.logger.setLevel(self._old_level)

    async def ingest(self, root: Path, count: int, size: int, seed: int = 1) -> list[str]:
        rng = random.Random(seed)
        ids = []
        for i in range(count):
            path = root / f"obj-{i:02d}.bin"
            path.write_bytes(rng.randbytes(size))
            r = await self.daemon.ingest(IngestRequest(path, "test", path.name, "normal"))
            ids.append(r.object_id)
        return ids

    def index(self) -> sqlite3.Connection:
        """A read-only look at the store's index, as an operator's sqlite3 shell would."""
        path = self.settings.site.state_dir / "index.sqlite"
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def cloud_files(self) -> list[Path]:
        root = Path(self.settings.backend.url.removeprefix("file://"))
        return [p for p in root.rglob("*") if p.is_file()]


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
