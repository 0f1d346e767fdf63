"""The daemon's long-running tasks, by name, in one TaskGroup: a reload stops and replaces one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterable
from typing import Any

Job = tuple[str, Coroutine[Any, Any, Any]]


class TaskSet:
    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def bind(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        assert self._group is not None, "spawn before the daemon's TaskGroup started"
        self._tasks[name] = self._group.create_task(coro, name=name)

    def spawn_all(self, jobs: Iterable[Job]) -> None:
        for name, coro in jobs:
            self.spawn(name, coro)

    async def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def cancel_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()
