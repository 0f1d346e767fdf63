"""Contact windows: when the link to the cloud is expected to be usable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agent.errors import SkyferryError


@dataclass(frozen=True)
class Contact:
    """One predicted contact: [start, end) in Unix seconds, with the expected rate if known."""

    start: float
    end: float
    rate_bps: float | None
    source: str
    # Predicted passes only: the highest elevation reached and which satellites serve it.
    max_elevation_deg: float | None = None
    detail: str | None = None

    @property
    def duration_s(self) -> float:
        return self.end - self.start


class ContactSource(Protocol):
    """Anything that can list its windows overlapping [start, end), in time order."""

    def contacts(self, start: float, end: float) -> list[Contact]: ...


class WindowFileError(SkyferryError):
    """A timetable or orbital-element file does not parse; says which file, line and field."""

    def __init__(self, path: str, line: int | None, field: str, problem: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.problem = problem
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {field}: {problem}")
