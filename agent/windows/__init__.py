"""Contact windows: when the link to the cloud is expected to be usable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Contact:
    """One predicted contact: [start, end) in Unix seconds, with the expected rate if known."""

    start: float
    end: float
    rate_bps: float | None
    source: str

    @property
    def duration_s(self) -> float:
        return self.end - self.start
