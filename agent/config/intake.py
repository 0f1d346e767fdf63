"""The sections of how data comes in and is cut: [[spool]], [put], [chunking], [compression]."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from agent.config import units
from agent.config.settings import (
    AfterIngest,
    ChunkingSettings,
    CompressionSettings,
    PutSettings,
    SpoolSettings,
)
from agent.config.site import (
    NAME_RE,
    RESERVED_SOURCE,
    check_priority,
    class_names,
    read_classes,
    read_site,
)
from agent.config.table import MISSING, Table, boolean, read_toml
from agent.errors import ConfigError

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
# pyfastcdc's bounds. The pipeline gives it avg_size - min_size as its average (its output
# averages min + avg), so that difference is what its avg limits apply to.
CDC_MIN_FLOOR = 64 << 10
CDC_MIN_CEILING = 1 << 20
CDC_AVG_SPAN_CEILING = 4 << 20
CDC_MAX_CEILING = 16 << 20
CHUNKING_KEYS = ("min_size", "avg_size", "max_size", "pack_below", "pack_size", "pack_files",
                 "pack_avg_size")


SPOOL_KEYS = ("name", "path", "priority", "settle", "after", "done_dir", "scan_interval",
              "create")


def read_spools(root: Table, base: Path, class_names: tuple[str, ...]
                ) -> tuple[SpoolSettings, ...]:
    how = 'write each spool as a [[spool]] section with name = "..." and path = "..."'
    spools = tuple(_spool(t, base, class_names) for t in root.tables("spool", SPOOL_KEYS, how))
    _reject_duplicates(root, "spool", "name", [s.name for s in spools])
    _reject_duplicates(root, "spool", "path", [str(s.path) for s in spools])
    return spools


def _spool(t: Table, base: Path, class_names: tuple[str, ...]) -> SpoolSettings:
    defaults = SpoolSettings(name="", path=Path())
    t.require("name", 'name = "sensors"')
    name = t.string("name", None)
    t.ensure(
        "name",
        name is None or NAME_RE.fullmatch(name) is not None,
        "is not a valid spool name",
        "use lower-case letters, digits, '_' or '-', starting with a letter or digit",
    )
    t.ensure(
        "name",
        name != RESERVED_SOURCE,
        f"{RESERVED_SOURCE!r} is reserved for `skyferry put`",
        "choose another name",
    )
    t.ensure(
        "name",
        name != "mqtt",
        "'mqtt' is reserved: restore writes MQTT batches under <site>/mqtt/",
        "choose another name",
    )
    t.require("path", 'path = "/srv/spool/sensors"')
    path = t.path("path", base, Path())
    priority = check_priority(t, defaults.priority, class_names)
    settle = t.duration("settle", defaults.settle_s)
    after = t.choice("after", ("delete", "move"), defaults.after)
    done_dir = t.path("done_dir", base, None)
    t.ensure(
        "done_dir",
        # An invalid `after` is reported on its own; do not pile a second problem on it.
        done_dir is None or after == "move" or t.raw("after") not in (MISSING, "delete"),
        'is only used with after = "move", and after is "delete"',
        'set after = "move", or remove done_dir',
    )
    scan = t.duration("scan_interval", defaults.scan_interval_s)
    t.positive("scan_interval", scan, 'give a duration such as "1s"')
    create = boolean(t, "create", defaults.create)
    return SpoolSettings(
        name=name or "",
        path=path,
        priority=priority,
        settle_s=settle,
        after=cast(AfterIngest, after),
        done_dir=done_dir,
        scan_interval_s=scan,
        create=create,
    )


def _reject_duplicates(root: Table, array: str, key: str, values: list[str]) -> None:
    first: dict[str, int] = {}
    for index, value in enumerate(values):
        if not value or value == ".":
            continue  # missing: already reported
        if value in first:
            root.problems.append(
                f"{array}[{index}].{key}: is the same as {array}[{first[value]}].{key} "
                f"(got {value!r}); give every {array} a different {key}"
            )
        else:
            first[value] = index


def read_put(root: Table, base: Path, state_dir: Path, class_names: tuple[str, ...]
             ) -> PutSettings:
    t = root.table("put", ("socket", "priority"))
    socket = t.path("socket", base, state_dir / "skyferry.sock")
    t.ensure(
        "socket",
        len(str(socket).encode()) <= MAX_SOCKET_PATH,
        f"the socket path {str(socket)!r} is longer than {MAX_SOCKET_PATH} bytes",
        "choose a shorter path (a Unix socket path cannot be longer)",
    )
    return PutSettings(socket=socket, priority=check_priority(t, "normal", class_names))


def read_chunking(root: Table) -> ChunkingSettings:
    t = root.table("chunking", CHUNKING_KEYS)
    defaults = ChunkingSettings()
    before = len(t.problems)
    low = t.size("min_size", defaults.min_size)
    avg = t.size("avg_size", defaults.avg_size)
    high = t.size("max_size", defaults.max_size)
    if len(t.problems) == before:
        _check_chunk_bounds(t, low, avg, high)
    below = t.size("pack_below", defaults.pack_below)
    t.ensure("pack_below", below <= CDC_MAX_CEILING, "must be at most 16MiB",
             'files this small are packed together; "0B" turns packing off')
    pack_size = t.size("pack_size", defaults.pack_size)
    t.ensure("pack_size", pack_size >= below, f"must be at least pack_below ({below} bytes)",
             "raise pack_size or lower pack_below")
    pack_files = t.integer("pack_files", defaults.pack_files)
    t.ensure("pack_files", 1 <= pack_files <= 100_000, "must be between 1 and 100000",
             "give how many files one pack may hold, e.g. 4096")
    pack_avg = t.size("pack_avg_size", defaults.pack_avg_size)
    t.ensure("pack_avg_size", 128 << 10 <= pack_avg <= 4 << 20,
             "must be between 128KiB and 4MiB",
             "smaller chunks re-send less after an edit, larger ones compress better")
    return ChunkingSettings(min_size=low, avg_size=avg, max_size=high, pack_below=below,
                            pack_size=pack_size, pack_files=pack_files, pack_avg_size=pack_avg)


def _check_chunk_bounds(t: Table, low: int, avg: int, high: int) -> None:
    """Enforce pyfastcdc's limits, naming sizes the way the operator wrote them."""
    fmt = units.format_size
    why = "(a limit of the pyfastcdc chunker)"
    t.ensure("min_size", low >= CDC_MIN_FLOOR, "must be at least 64KiB", f"raise it {why}")
    t.ensure("min_size", low <= CDC_MIN_CEILING, "must be at most 1MiB", f"lower it {why}")
    t.ensure(
        "avg_size",
        avg >= 2 * low,
        f"must be at least twice min_size ({fmt(low)})",
        f"raise avg_size or lower min_size {why}",
    )
    t.ensure(
        "avg_size",
        avg - low <= CDC_AVG_SPAN_CEILING,
        f"must be at most 4MiB above min_size ({fmt(low)})",
        f"lower avg_size {why}",
    )
    t.ensure(
        "max_size",
        high > avg,
        f"must be greater than avg_size ({fmt(avg)})",
        "raise max_size or lower avg_size",
    )
    t.ensure("max_size", high <= CDC_MAX_CEILING, "must be at most 16MiB", f"lower it {why}")


def read_compression(root: Table) -> CompressionSettings:
    t = root.table("compression", ("level", "min_ratio"))
    defaults = CompressionSettings()
    level = _compression_level(t, defaults.level)
    ratio = t.number("min_ratio", defaults.min_ratio)
    t.ensure(
        "min_ratio",
        0 < ratio <= 1,
        "must be greater than 0 and at most 1",
        "give the fraction a sample must shrink below to be compressed, e.g. 0.95",
    )
    return CompressionSettings(level=level, min_ratio=ratio)


def _compression_level(t: Table, default: int | Literal["auto"]) -> int | Literal["auto"]:
    value = t.raw("level")
    if value is MISSING or value == "auto":
        return "auto" if value == "auto" else default
    fix = ('write a zstd level from 1 (fastest) to 22 (smallest) without quotes, or "auto" to '
           "let the backlog and the link budget choose")
    if isinstance(value, bool) or not isinstance(value, int):
        t.report("level", 'must be an integer from 1 to 22 or "auto"', fix)
        return default
    if not 1 <= value <= 22:
        t.report("level", "must be between 1 and 22", fix)
        return default
    return value


@dataclass(frozen=True)
class PutView:
    """What `skyferry put` needs of the config to hand files to a running daemon."""

    put: PutSettings
    classes: tuple[str, ...]
    chunking: ChunkingSettings  # its pack thresholds group small files as a spool groups them


def read_put_view(path: Path) -> PutView:
    """The [site], [classes], [put] and [chunking] sections alone, for `skyferry put` through
    the daemon's socket: the whole validation (agent.daemon.site_config) loads every backend
    service and window source, a third of a second of a put on a busy two-core site. The
    daemon checked its whole config at start; a put that finds no daemon still reads all of
    it."""
    problems: list[str] = []
    root = Table(read_toml(path), "", problems)
    base = path.absolute().parent
    site = read_site(root, base)
    read_classes(root)  # a broken [classes] is reported here as in the whole validation
    names = class_names(root)
    put = read_put(root, base, site.state_dir, names)
    chunking = read_chunking(root)
    if problems:
        raise ConfigError(problems, str(path))
    return PutView(put, names, chunking)
