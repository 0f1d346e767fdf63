"""The window sources [windows] can configure besides intervals, daily and cycle.

Adding one: a module with its ContactSource and, there or in a config module of its own (as
tle_config.py keeps the TLE reader apart from the predictor), `KEYS`, `read_settings(t, base)` for
those [windows] keys and `open_sources(settings)` that builds it; its settings field in
WindowSettings; and one line in SOURCES. The reader (agent/windows/reader.py) and the forecast
(agent/windows/forecast.py) only walk this list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.settings import WindowSettings
from agent.config.table import Table
from agent.windows import ContactSource, timetable, tle_config


@dataclass(frozen=True)
class SourceKind:
    # The [windows] keys it reads. Each adds windows, so with mode = "always" they are ignored.
    keys: tuple[str, ...]
    read_settings: Callable[[Table, Path], dict[str, Any]]  # WindowSettings fields from its keys
    open_sources: Callable[[WindowSettings], list[ContactSource]]  # may raise WindowFileError


# In the order their problems are reported.
SOURCES: tuple[SourceKind, ...] = (
    SourceKind(timetable.KEYS, timetable.read_settings, timetable.open_sources),
    SourceKind(tle_config.KEYS, tle_config.read_settings, tle_config.open_sources),
)
SOURCE_KEYS = tuple(key for kind in SOURCES for key in kind.keys)


def open_sources(settings: WindowSettings) -> list[ContactSource]:
    """Every source the settings configure, in SOURCES order."""
    return [source for kind in SOURCES for source in kind.open_sources(settings)]
