"""Contact windows: when the link to the cloud is expected to be usable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from agent.errors import SkyferryError

# The daemon keeps windows computed this far ahead (and a little behind, for a window in
# progress); `skyferry windows --hours` computes whatever it is asked for.
PREDICT_BEHIND_S = 6 * 3600.0
PREDICT_AHEAD_S = 48 * 3600.0


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
    """One source of windows the forecast combines (timetable, predicted passes, ...).

    `contacts` is the whole protocol for a source computed from settings alone. The other
    methods are upkeep hooks with do-nothing defaults, so a source that reads files or predicts
    ahead subclasses this protocol and overrides only what it needs. `contacts` must stay cheap:
    the gate calls it on the event loop; slow work belongs in `prepare` and `refresh`, which run
    in a thread.
    """

    def contacts(self, start: float, end: float) -> list[Contact]:
        """Windows overlapping [start, end), in time order."""
        ...

    def prepare(self, start: float, end: float) -> None:
        """Compute what `contacts` over [start, end) needs (blocking)."""
        return None

    def refresh(self, now: float) -> list[str]:
        """Re-read changed inputs and compute ahead of `now` (blocking); problems to report."""
        return []

    def watch(self, now: float, metrics: Any) -> None:
        """Cheap periodic checks on the event loop: metrics and warnings about stale inputs."""
        return None

    def warnings(self, now: float) -> list[str]:
        """What `skyferry windows` should warn about before listing the windows."""
        return []


class WindowFileError(SkyferryError):
    """A timetable or orbital-element file does not parse; says which file, line and field."""

    def __init__(self, path: str, line: int | None, field: str, problem: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.problem = problem
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {field}: {problem}")
