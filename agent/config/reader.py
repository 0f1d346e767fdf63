"""Load and validate the TOML config into frozen `Settings`, reporting every problem at once.

Each problem reads `<key.path>: <what is wrong> (got <value>); <how to fix>` so an operator can
fix the whole file in one pass instead of one error per restart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, cast

from agent.backends.config import read_backend
from agent.config import units
from agent.config.settings import (
    DEFAULT_CLASSES,
    AfterIngest,
    ChunkingSettings,
    ClassSettings,
    CompressionSettings,
    KeySettings,
    PutSettings,
    QuotaPolicy,
    Settings,
    SiteSettings,
    SpoolSettings,
    StoreSettings,
    TelemetrySettings,
    UplinkSettings,
)
from agent.config.table import MISSING, Table, boolean, read_toml
from agent.errors import ConfigError
from agent.windows.reader import read_windows

LogFormat = Literal["auto", "json", "text"]

SITE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
RESERVED_SOURCE = "put"  # the source name `skyferry put` uses
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
# pyfastcdc's bounds. The pipeline gives it avg_size - min_size as its average (its output
# averages min + avg), so that difference is what its avg limits apply to.
CDC_MIN_FLOOR = 64 << 10
CDC_MIN_CEILING = 1 << 20
CDC_AVG_SPAN_CEILING = 4 << 20
CDC_MAX_CEILING = 16 << 20


TOP_LEVEL_KEYS = (
    "site", "keys", "store", "classes", "chunking", "compression", "spool",
    "put", "backend", "uplink", "windows", "telemetry", "mqtt",
)  # fmt: skip




def load_settings(path: Path) -> Settings:
    """Read and validate the config file; raise one ConfigError listing every problem."""
    return validate(read_toml(path), path)


def validate(data: Mapping[str, object], path: Path) -> Settings:
    """Turn parsed TOML into Settings; relative paths are taken from `path`'s directory."""
    problems: list[str] = []
    root = Table(data, "", problems)
    root.reject_unknown(TOP_LEVEL_KEYS)
    base = path.absolute().parent
    # Sections are read in the order the example file uses, so problems come out in that order.
    site = _site(root.table("site", ("id", "state_dir")), base)
    keys = _keys(root.table("keys", ("recipient_public", "signing_key", "dedup_key")), base)
    store = _store(root.table("store", ("quota",)))
    classes = _classes(root)
    class_names = _class_names(root)
    chunking = _chunking(root.table("chunking", (
        "min_size", "avg_size", "max_size", "pack_below", "pack_size", "pack_files",
        "pack_avg_size")))
    compression = _compression(root.table("compression", ("level", "min_ratio")))
    spools = _spools(root, base, class_names)
    put = _put(root.table("put", ("socket", "priority")), base, site.state_dir, class_names)
    backend = read_backend(root.table("backend"), base)
    uplink = _uplink(
        root.table("uplink", ("streams", "aging", "retry_initial", "retry_max", "rate"))
    )
    windows = read_windows(root.table("windows"), base)
    telemetry = _telemetry(root.table("telemetry", ("log_level", "log_format", "metrics_listen")))
    from agent.config.mqtt import read_mqtt  # here: it builds on this module's helpers

    mqtt = read_mqtt(root, base, site.id, class_names, tuple(s.name for s in spools))
    if problems:
        raise ConfigError(problems, str(path))
    return Settings(
        site=site,
        keys=keys,
        backend=backend,
        put=put,
        store=store,
        classes=classes,
        chunking=chunking,
        compression=compression,
        spools=spools,
        uplink=uplink,
        windows=windows,
        telemetry=telemetry,
        mqtt=mqtt,
    )


def check_config_main(path: Path) -> int:
    """`skyferry check-config FILE`: print OK and a summary (0), or every problem (2).

    The same checks as `run` at start (agent/daemon/preflight.py): the file, and what it points at.
    """
    from agent.daemon.preflight import load_checked, print_problems

    try:
        settings = load_checked(path)
    except ConfigError as exc:
        print_problems(exc)
        return 2
    print(f"OK: {path}")
    print(summarize(settings))
    return 0


def summarize(settings: Settings) -> str:
    """One line naming what the config sets up, for `check-config` and the start-up log."""
    spools = ", ".join(s.name for s in settings.spools)
    classes = ", ".join(c.name for c in settings.classes)
    return (
        f"site {settings.site.id}; {len(settings.spools)} spool(s)"
        + (f" ({spools})" if spools else "")
        + f"; {len(settings.classes)} class(es) ({classes}); backend {settings.backend.url}"
        + f"; windows {settings.windows.mode}"
        + (f"; mqtt {settings.mqtt.host}:{settings.mqtt.port} "
           f"({len(settings.mqtt.subscriptions)} subscription(s))" if settings.mqtt else "")
    )


def _site(t: Table, base: Path) -> SiteSettings:
    t.require("id", 'id = "camp-alpha"')
    site_id = t.string("id", None)
    t.ensure(
        "id",
        site_id is None or SITE_ID_RE.fullmatch(site_id) is not None,
        "is not a valid site id",
        "use 1-63 lower-case letters, digits or '-', starting with a letter or digit "
        "(it becomes part of cloud object keys)",
    )
    t.require("state_dir", 'state_dir = "/var/lib/skyferry"')
    return SiteSettings(id=site_id or "", state_dir=t.path("state_dir", base, Path()))


def _keys(t: Table, base: Path) -> KeySettings:
    paths: dict[str, Path] = {}
    for name, example in (
        ("recipient_public", "keys/recipient.pub"),
        ("signing_key", "keys/site.key"),
        ("dedup_key", "keys/dedup.key"),
    ):
        t.require(name, f'{name} = "{example}"')
        paths[name] = t.path(name, base, Path())
    return KeySettings(**paths)


def _store(t: Table) -> StoreSettings:
    quota = t.size("quota", None)
    t.positive("quota", quota, 'give a size such as "50GiB", or remove quota for no limit')
    return StoreSettings(quota_bytes=quota)


def _classes(root: Table) -> tuple[ClassSettings, ...]:
    if not root.has("classes"):
        return DEFAULT_CLASSES
    table = root.table("classes")
    if not table.data and isinstance(root.raw("classes"), dict):
        root.report(
            "classes",
            "defines no class",
            "add [classes.<name>] tables, or remove [classes] to use the defaults "
            "critical, high, normal, bulk",
        )
    classes = [c for name in table.data if (c := _class(table, name)) is not None]
    _reject_duplicate_ranks(table, classes)
    return tuple(sorted(classes, key=lambda c: c.rank))


def _class(table: Table, name: str) -> ClassSettings | None:
    if not isinstance(table.raw(name), dict):
        table.report(name, "must be a table", f"write it as [classes.{name}] with rank = ...")
        return None
    t = table.table(name, ("rank", "policy", "ttl"))
    if NAME_RE.fullmatch(name) is None:
        table.problems.append(
            f"{table.key(name)}: is not a valid class name (got {name!r}); "
            "use lower-case letters, digits, '_' or '-', starting with a letter or digit"
        )
    t.require("rank", "rank = 0 (lower is served first)")
    rank = t.integer("rank", -1)  # -1 when missing or invalid: already reported
    if type(t.raw("rank")) is int and rank == t.raw("rank"):  # else already reported
        t.ensure("rank", rank >= 0, "must not be negative", "use 0 for the most urgent class")
    policy = t.choice("policy", ("refuse", "evict-oldest"), "evict-oldest")
    ttl = t.duration("ttl", None)
    t.positive("ttl", ttl, 'give a duration such as "7d", or remove ttl to keep data forever')
    return ClassSettings(name=name, rank=rank, policy=cast(QuotaPolicy, policy), ttl_s=ttl)


def _class_names(root: Table) -> tuple[str, ...]:
    """Class names as written, valid or not, so a broken class is reported once, not at each use."""
    if not root.has("classes"):
        return tuple(c.name for c in DEFAULT_CLASSES)
    written = root.raw("classes")
    return tuple(written) if isinstance(written, dict) else ()


def _reject_duplicate_ranks(table: Table, classes: list[ClassSettings]) -> None:
    seen: dict[int, str] = {}
    for c in classes:
        if c.rank < 0:
            continue  # missing or invalid: already reported
        if c.rank in seen:
            table.problems.append(
                f"classes.{c.name}.rank: is already used by class {seen[c.rank]!r} "
                f"(got {c.rank}); give every class a different rank"
            )
        else:
            seen[c.rank] = c.name


def _check_priority(t: Table, default: str, class_names: tuple[str, ...]) -> str:
    """Read `priority` and make sure it names a configured class."""
    priority = t.string("priority", None)
    if priority is None and t.has("priority"):
        return default  # not a string: already reported
    if not class_names:
        return priority or default  # a [classes] without classes is reported on its own
    if priority in class_names or (priority is None and default in class_names):
        return priority or default
    fix = f"use one of {', '.join(class_names)}"
    if t.has("priority"):
        t.report("priority", "names no configured class", fix)
    else:
        t.problems.append(
            f"{t.key('priority')}: the default class {default!r} is not configured "
            f"(got nothing); set priority, or add [classes.{default}]; {fix}"
        )
    return priority or default


def _chunking(t: Table) -> ChunkingSettings:
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


def _compression(t: Table) -> CompressionSettings:
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


SPOOL_KEYS = ("name", "path", "priority", "settle", "after", "done_dir", "scan_interval",
              "create")


def _spools(root: Table, base: Path, class_names: tuple[str, ...]) -> tuple[SpoolSettings, ...]:
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
    priority = _check_priority(t, defaults.priority, class_names)
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


def _put(t: Table, base: Path, state_dir: Path, class_names: tuple[str, ...]) -> PutSettings:
    socket = t.path("socket", base, state_dir / "skyferry.sock")
    t.ensure(
        "socket",
        len(str(socket).encode()) <= MAX_SOCKET_PATH,
        f"the socket path {str(socket)!r} is longer than {MAX_SOCKET_PATH} bytes",
        "choose a shorter path (a Unix socket path cannot be longer)",
    )
    return PutSettings(socket=socket, priority=_check_priority(t, "normal", class_names))


def _uplink(t: Table) -> UplinkSettings:
    defaults = UplinkSettings()
    streams = t.integer("streams", defaults.streams)
    t.ensure("streams", 1 <= streams <= 64, "must be between 1 and 64", "4 suits most links")
    aging = t.duration("aging", defaults.aging_s)
    t.positive("aging", aging, 'give a duration such as "6h"')
    initial = t.duration("retry_initial", defaults.retry_initial_s)
    t.positive("retry_initial", initial, 'give a duration such as "1s"')
    most = t.duration("retry_max", defaults.retry_max_s)
    t.ensure(
        "retry_max",
        most >= initial,
        f"must not be shorter than retry_initial ({units.format_duration(initial)})",
        "raise retry_max or lower retry_initial",
    )
    rate = t.rate("rate", None)
    t.positive("rate", rate, 'give a rate such as "15Mbit/s", or leave it out for no cap')
    return UplinkSettings(
        streams=streams, aging_s=aging, retry_initial_s=initial, retry_max_s=most, rate_bps=rate
    )


def _telemetry(t: Table) -> TelemetrySettings:
    level = t.choice("log_level", ("debug", "info", "warning", "error"), "info")
    fmt = t.choice("log_format", ("auto", "json", "text"), "auto")
    listen = _listen_address(t, "metrics_listen")
    return TelemetrySettings(
        log_level=level, log_format=cast(LogFormat, fmt), metrics_listen=listen
    )


DEFAULT_METRICS_LISTEN = ("127.0.0.1", 9464)  # localhost only: the page shows queue contents


def _listen_address(t: Table, name: str) -> tuple[str, int] | None:
    text = t.string(name, None)
    if text is None:
        return DEFAULT_METRICS_LISTEN if not t.has(name) else None
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        t.report(name, "must be HOST:PORT or \"off\"", 'write e.g. "127.0.0.1:9464"')
        return None
    return host.strip("[]"), int(port)
