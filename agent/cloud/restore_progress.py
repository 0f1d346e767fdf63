"""The one-line progress display of restore and verify."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from agent.config.units import format_size


class Progress:
    """One self-rewriting status line on a terminal; silent otherwise."""

    def __init__(self, total_objects: int, total_bytes: int, stream: TextIO = sys.stderr,
                 enabled: bool | None = None) -> None:
        self.total_objects, self.total_bytes = total_objects, total_bytes
        self.objects = self.bytes = 0
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._start = time.monotonic()

    def advance(self, nbytes: int, objects: int = 0) -> None:
        self.bytes += nbytes
        self.objects += objects
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.objects == self.total_objects):
            self._last = now
            rate = self.bytes / max(1e-6, now - self._start)
            self.stream.write(
                f"\r{self.objects}/{self.total_objects} objects  "
                f"{format_size(self.bytes)}/{format_size(self.total_bytes)}  "
                f"{format_size(int(rate))}/s   ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
