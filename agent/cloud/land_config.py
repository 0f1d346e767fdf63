"""land.toml: [source] and [dest] backend tables (the edge config's [backend] keys, credentials
as *_file / *_env, never inline) and [land] (poll, backfill, key, work_dir)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.backends.config import read_backend
from agent.config.settings import BackendSettings
from agent.config.table import Table, read_toml
from agent.errors import ConfigError

LAND_KEYS = ("poll", "backfill", "key", "work_dir", "parallel")


@dataclass(frozen=True)
class LandSettings:
    source: BackendSettings | None = None
    dest: BackendSettings | None = None
    poll_s: float = 2.0
    backfill_s: float = 600.0
    key: Path | None = None  # the recipient private key; site keys in sites/ beside it
    work_dir: Path = Path(tempfile.gettempdir())
    parallel: int = 8


def _backend(data: dict[str, object], name: str, url: str | None, base: Path,
             problems: list[str]) -> BackendSettings | None:
    table = data.get(name, {})
    if not isinstance(table, dict):
        problems.append(f"{name}: must be a table (got a value); write it as a [{name}] section")
        return None
    if url is not None:
        table = {**table, "url": url}
    if not table:
        return None
    return read_backend(Table(table, name, problems), base)


def load_land_settings(path: Path | None, source_url: str | None = None,
                       dest_url: str | None = None) -> LandSettings:
    """The settings of `path` (None: defaults), the URLs given on the command line winning."""
    data = read_toml(path) if path is not None else {}
    base = path.absolute().parent if path is not None else Path.cwd()
    problems: list[str] = []
    for name in data:
        if name not in ("source", "dest", "land"):
            problems.append(f"{name}: unknown section; land.toml has [source], [dest] and [land]")
    defaults = LandSettings()
    land = data.get("land", {})
    t = Table(land if isinstance(land, dict) else {}, "land", problems)
    t.reject_unknown(LAND_KEYS)
    poll = t.duration("poll", defaults.poll_s)
    t.positive("poll", poll, 'give a duration such as "2s"')
    backfill = t.duration("backfill", defaults.backfill_s)
    t.positive("backfill", backfill, 'give a duration such as "10m"')
    parallel = t.integer("parallel", defaults.parallel)
    t.ensure("parallel", 1 <= parallel <= 256, f"must be 1 to 256, not {parallel}",
             "parallel = 8")
    settings = LandSettings(
        source=_backend(data, "source", source_url, base, problems),
        dest=_backend(data, "dest", dest_url, base, problems),
        poll_s=poll, backfill_s=backfill, key=t.path("key", base, None),
        work_dir=t.path("work_dir", base, defaults.work_dir), parallel=parallel)
    if problems:
        raise ConfigError(problems, str(path) if path else "command line")
    return settings
