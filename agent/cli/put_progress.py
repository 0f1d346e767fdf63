"""The one-line progress display of `skyferry put` of many files."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from agent.config.units import format_size


class PutProgress:
    """Files and bytes queued so far, on one self-rewriting line of a terminal; silent
    otherwise (or when told)."""

    def __init__(self, files: int, total_bytes: int, stream: TextIO = sys.stderr,
                 enabled: bool | None = None) -> None:
        self.files, self.total_bytes = files, total_bytes
        self.done = self.bytes = 0
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._start = time.monotonic()
        self._last = 0.0

    def advance(self, files: int, nbytes: int) -> None:
        self.done += files
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.done == self.files):
            self._last = now
            rate = self.bytes / max(1e-6, now - self._start)
            self.stream.write(f"\rput: {self.done}/{self.files} files  "
                              f"{format_size(self.bytes)}/{format_size(self.total_bytes)}  "
                              f"{format_size(int(rate))}/s   ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()
