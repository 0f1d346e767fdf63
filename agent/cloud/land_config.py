"""land.toml: [source] and [dest] backend tables (the edge config's [backend] keys, credentials
as *_file / *_env, never inline), [land] (poll, backfill, key, work_dir, discovery), and the
optional [queue] (the work queue: agent/backends/workqueue_config.py, plus lease and
max_receives), [events] (MQTT / webhook downstream: agent/cloud/land_events.py), and
listen and silent_after for the fleet view (agent/cloud/land_serve.py)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agent.backends.config import read_backend
from agent.backends.workqueue_config import QueueSettings, read_queue
from agent.cloud.land_events import DownstreamSettings
from agent.config.settings import BackendSettings
from agent.config.table import Table, read_toml, secret
from agent.errors import ConfigError

LAND_KEYS = ("poll", "backfill", "key", "work_dir", "parallel", "discovery",
             "delete_sealed_after", "retention_margin", "listen", "silent_after")
SILENT_AFTER_S = 86400.0  # a site with no heartbeat for this long is shown as silent
DEFAULT_RETENTION_MARGIN_S = 86400.0
LEASE_KEYS = ("lease", "max_receives")  # [queue] keys the lander reads; the rest are the queue's
EVENT_KEYS = ("mqtt", "mqtt_topic", "mqtt_username", "mqtt_password_file", "mqtt_password_env",
              "webhook", "webhook_token_file", "webhook_token_env", "timeout", "retry_max")
SECTIONS = ("source", "dest", "land", "queue", "events")


@dataclass(frozen=True)
class QueueWork:
    """[queue]: where work items go and how long a worker holds one."""

    queue: QueueSettings
    lease_s: float = 30.0  # the visibility timeout; extended while a manifest lands
    max_receives: int = 5  # received this often without being landed: dead-lettered


@dataclass(frozen=True)
class LandSettings:
    source: BackendSettings | None = None
    dest: BackendSettings | None = None
    poll_s: float = 2.0
    backfill_s: float = 600.0
    key: Path | None = None  # the recipient private key; site keys in sites/ beside it
    work_dir: Path = Path(tempfile.gettempdir())
    parallel: int = 8
    # Retention (agent/cloud/land_retention.py): delete landed sealed objects older than this;
    # None: never. A site's objects only while it declares a horizon h with h + margin <= it.
    delete_sealed_after_s: float | None = None
    retention_margin_s: float = DEFAULT_RETENTION_MARGIN_S
    discovery: str = "listing"  # or "notification" (needs [queue])
    queue: QueueWork | None = None
    events: DownstreamSettings = field(default_factory=DownstreamSettings)
    listen: tuple[str, int] | None = None  # the fleet page and /metrics (agent/cloud/land_serve.py)
    silent_after_s: float = SILENT_AFTER_S


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
        if name not in SECTIONS:
            problems.append(f"{name}: unknown section; land.toml has [source], [dest], [land], "
                            "[queue] and [events]")
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
    grace = t.duration("delete_sealed_after", None)
    margin = t.duration("retention_margin", defaults.retention_margin_s)
    t.positive("retention_margin", margin, 'give a duration such as "1d"')
    t.ensure("delete_sealed_after", grace is None or grace > margin,
             f"must be longer than retention_margin ({margin:g}s): a site's dedup horizon "
             "plus the margin must fit in it", 'delete_sealed_after = "31d" for sites with '
             'dedup_horizon = "30d", or leave it out to delete nothing')
    discovery = t.choice("discovery", ("listing", "notification"), defaults.discovery)
    queue = _queue(data, base, problems)
    if discovery == "notification" and queue is None:
        problems.append("land.discovery: notification needs a [queue] (the queue the storage "
                        "events are delivered to); add one, or use discovery = \"listing\"")
    silent = t.duration("silent_after", defaults.silent_after_s)
    t.positive("silent_after", silent, 'give a duration such as "1d"')
    settings = LandSettings(
        source=_backend(data, "source", source_url, base, problems),
        dest=_backend(data, "dest", dest_url, base, problems),
        poll_s=poll, backfill_s=backfill, key=t.path("key", base, None),
        work_dir=t.path("work_dir", base, defaults.work_dir), parallel=parallel,
        delete_sealed_after_s=grace, retention_margin_s=margin,
        discovery=discovery, queue=queue, events=_events(data, base, problems),
        listen=_listen(t), silent_after_s=silent)
    if problems:
        raise ConfigError(problems, str(path) if path else "command line")
    return settings


def _section(data: dict[str, object], name: str, problems: list[str]) -> dict[str, object] | None:
    raw = data.get(name)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{name}: must be a table (got a value); write it as a [{name}] section")
        return None
    return raw


def _queue(data: dict[str, object], base: Path, problems: list[str]) -> QueueWork | None:
    raw = _section(data, "queue", problems)
    if raw is None:
        return None
    mine = Table({k: v for k, v in raw.items() if k in LEASE_KEYS}, "queue", problems)
    lease = mine.duration("lease", QueueWork.lease_s)
    mine.positive("lease", lease, 'give a duration such as "30s"')
    receives = mine.integer("max_receives", QueueWork.max_receives)
    mine.ensure("max_receives", 1 <= receives <= 1000, f"must be 1 to 1000, not {receives}",
                "max_receives = 5")
    rest = Table({k: v for k, v in raw.items() if k not in LEASE_KEYS}, "queue", problems)
    return QueueWork(read_queue(rest, base), lease, receives)


def _events(data: dict[str, object], base: Path, problems: list[str]) -> DownstreamSettings:
    raw = _section(data, "events", problems)
    d = DownstreamSettings()
    if raw is None:
        return d
    t = Table(raw, "events", problems)
    for name in ("mqtt_password", "webhook_token"):
        if t.has(name):  # not t.report: that would echo the secret
            problems.append(f"{t.key(name)}: secrets are not accepted inline (got a value, not "
                            f'shown); set {name}_file = "/etc/skyferry/{name}" (a file only '
                            f'skyferry can read) or {name}_env = "VARIABLE"')
    t.reject_unknown((*EVENT_KEYS, "mqtt_password", "webhook_token"))
    mqtt = t.string("mqtt", None)
    if mqtt is not None and not mqtt.startswith(("mqtt://", "mqtts://")):
        t.report("mqtt", "is not an MQTT URL", 'write "mqtt://host:1883" or "mqtts://host:8883"')
    webhook = t.string("webhook", None)
    if webhook is not None and not webhook.startswith(("http://", "https://")):
        t.report("webhook", "is not an http(s) URL", 'write "https://host/path"')
    timeout = t.duration("timeout", d.timeout_s)
    t.positive("timeout", timeout, 'give a duration such as "10s"')
    retry_max = t.duration("retry_max", d.retry_max_s)
    t.positive("retry_max", retry_max, 'give a duration such as "1m"')
    return DownstreamSettings(
        mqtt=mqtt, mqtt_topic=t.string("mqtt_topic", d.mqtt_topic),
        mqtt_username=t.string("mqtt_username", None),
        mqtt_password=secret(t, "mqtt_password", base), webhook=webhook,
        webhook_token=secret(t, "webhook_token", base), timeout_s=timeout,
        retry_max_s=retry_max)


def _listen(t: Table) -> tuple[str, int] | None:
    text = t.string("listen", None)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        t.report("listen", "must be HOST:PORT", 'write e.g. "127.0.0.1:9465"')
        return None
    return host.strip("[]"), int(port)
