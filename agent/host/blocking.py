"""How blocking work (fsync, sqlite, file reads, sealing) leaves the event loop.

One policy for the whole daemon: the daemon owns the executors and hands every component a
`RunBlocking` callable; components never pick an executor themselves, so how many threads touch
the disk at once is decided in one place (docs/DESIGN.md, "Threading model").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

RunBlocking = Callable[..., Awaitable[Any]]
"""`await run_blocking(fn, *args)` runs `fn(*args)` off the event loop and returns its result."""
