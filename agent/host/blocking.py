"""How blocking work (fsync, sqlite, file reads, sealing) leaves the event loop.

One policy for the whole daemon: the daemon owns the executors (`Executors`) and hands every
component a `RunBlocking` callable, or the `Blocking` policy when it needs more than one kind of
thread; components never pick an executor themselves, so how many threads touch the disk at once
is decided in one place (docs/DESIGN.md, "Threading model").
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

RunBlocking = Callable[..., Awaitable[Any]]
"""`await run_blocking(fn, *args)` runs `fn(*args)` off the event loop and returns its result."""

Serve = Callable[[str, Callable[[], None]], None]
"""`serve(name, loop)` runs a server's `loop()` (it returns once the server is shut down) on a
thread of its own named `name`."""

IO_WORKERS = 4  # ingests (sealing), store queries, saves: at most this many at once
ANSWER_WORKERS = 2  # short reads that answer a waiting caller (`skyferry status`)
SIDE_WORKERS = 2  # spool folder scans and disposals
SERVE_JOIN_S = 5.0  # at shutdown, how long a stopped server's thread may take to return


@dataclass(frozen=True)
class Blocking:
    """The threads a component may use, handed to it by the daemon."""

    run: RunBlocking  # the I/O pool: everything that may queue behind ingests
    answer: RunBlocking  # a pool of its own: replies that must not wait behind ingests
    side: RunBlocking  # another: folder scans and disposals, which must not wait either
    serve: Serve  # a long-lived server loop (the metrics port)


class Executors:
    """The daemon's threads for blocking work; a context manager: leaving it waits for the work
    in flight, so the store closes only after the last thread that uses it is done."""

    def __init__(self, io_workers: int = IO_WORKERS) -> None:
        self._io = ThreadPoolExecutor(max_workers=io_workers, thread_name_prefix="skyferry-io")
        self._answer = ThreadPoolExecutor(max_workers=ANSWER_WORKERS,
                                          thread_name_prefix="skyferry-answer")
        # Folder scans and disposals: short, but they must not wait behind an ingest.
        self._side = ThreadPoolExecutor(max_workers=SIDE_WORKERS,
                                        thread_name_prefix="skyferry-side")
        # Seals a chunk of an object while the ingesting thread cuts the next (agent/ingest).
        self.seal = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyferry-seal")
        self._servers: list[threading.Thread] = []
        self.policy = Blocking(run=self.run_blocking, answer=self.run_answer,
                               side=self.run_side, serve=self.serve)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """The one way blocking work leaves the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, functools.partial(fn, *args))

    async def run_answer(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._answer, functools.partial(fn, *args))

    async def run_side(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._side, functools.partial(fn, *args))

    def serve(self, name: str, loop: Callable[[], None]) -> None:
        # A daemon thread: a server that was never shut down must not keep the process alive.
        thread = threading.Thread(target=loop, name=name, daemon=True)
        self._servers.append(thread)
        thread.start()

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self._answer.shutdown(wait=True)
        self._side.shutdown(wait=True)
        self.seal.shutdown(wait=True)
        for thread in self._servers:
            thread.join(SERVE_JOIN_S)

    def __enter__(self) -> Executors:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
