"""Frozen, typed settings: what `agent.daemon.site_config` assembles from the TOML file.

Every other module receives these objects; nobody else reads TOML or the environment.
Sizes are in bytes, durations in seconds (float), rates in bytes per second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

QuotaPolicy = Literal["refuse", "evict-oldest"]
AfterIngest = Literal["delete", "move"]
WindowMode = Literal["always", "schedule"]

@dataclass(frozen=True)
class SiteSettings:
    id: str
    state_dir: Path


@dataclass(frozen=True)
class KeySettings:
    recipient_public: Path
    signing_key: Path
    dedup_key: Path


@dataclass(frozen=True)
class ClassSettings:
    """One priority class. Lower rank is served first."""

    name: str
    rank: int
    policy: QuotaPolicy
    ttl_s: float | None = None


# The classes of a config that defines none.
DEFAULT_CLASSES: tuple[ClassSettings, ...] = (
    ClassSettings("critical", 0, "refuse"),
    ClassSettings("high", 1, "refuse"),
    ClassSettings("normal", 2, "evict-oldest"),
    ClassSettings("bulk", 3, "evict-oldest"),
)


@dataclass(frozen=True)
class StoreSettings:
    quota_bytes: int | None = None  # None: no quota beyond the disk itself


@dataclass(frozen=True)
class ChunkingSettings:
    min_size: int = 1 << 20
    avg_size: int = 4 << 20
    max_size: int = 16 << 20
    # Files below pack_below are sealed together, up to pack_size bytes or pack_files files
    # per pack, cut into smaller chunks (pack_avg_size) so an edit re-sends little.
    pack_below: int = 1 << 20
    pack_size: int = 32 << 20
    pack_files: int = 4096
    pack_avg_size: int = 256 << 10

    @property
    def pack_min_size(self) -> int:
        return max(64 << 10, self.pack_avg_size // 4)

    @property
    def pack_max_size(self) -> int:
        return self.pack_avg_size * 4


@dataclass(frozen=True)
class CompressionSettings:
    # 1-22, or "auto": chosen from the backlog and the link budget
    # (agent/ingest/compression_policy.py)
    level: int | Literal["auto"] = "auto"
    min_ratio: float = 0.95  # keep a chunk compressed only if level 1 shrinks it to this or less


@dataclass(frozen=True)
class SpoolSettings:
    name: str
    path: Path
    priority: str = "normal"
    settle_s: float = 2.0
    after: AfterIngest = "delete"
    done_dir: Path | None = None  # used when after == "move"; default <path>/done
    scan_interval_s: float = 1.0
    create: bool = False  # make the folder if it is missing (else: an error, retried)

    @property
    def effective_done_dir(self) -> Path:
        return self.done_dir if self.done_dir is not None else self.path / "done"


@dataclass(frozen=True)
class PutSettings:
    socket: Path
    priority: str = "normal"


@dataclass(frozen=True)
class SecretRef:
    """Where a secret is read from when the backend is opened; never the secret itself."""

    source: Literal["file", "env"]
    where: str  # a file path, or the name of an environment variable

    def describe(self) -> str:
        return f"file {self.where}" if self.source == "file" else f"${self.where}"


@dataclass(frozen=True)
class ServiceSettings:
    """The [backend] keys one storage service owns (account, region, credentials...).

    Each backend module (agent/backends/<service>.py) subclasses this with its own fields and
    reads them; this room never needs to know which services exist.
    """

    def secrets(self) -> dict[str, SecretRef | None]:
        """The service's secrets by name (`account_key`, ...), in the order they are checked."""
        return {}


@dataclass(frozen=True)
class BackendSettings:
    """Where the cloud copy goes: a URL, the keys every service shares, and the service's own."""

    url: str  # file:///path or <scheme>://container-or-bucket[/prefix]
    endpoint: str | None = None  # e.g. an emulator, MinIO, a sovereign cloud; None: the public one
    allow_http: bool = False
    connect_timeout_s: float = 10.0
    timeout_s: float = 30.0  # waiting for an answer, and the longest a connection may stall
    min_rate_bps: float = 8000.0  # an upload of n bytes may take timeout + n / min_rate
    service: ServiceSettings = field(default_factory=ServiceSettings)


@dataclass(frozen=True)
class UplinkSettings:
    streams: int = 4
    aging_s: float = 6 * 3600.0  # a waiting object climbs one class per aging period
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    rate_bps: float | None = None  # cap shared by all streams; a window's own rate may be lower
    # Dedup only against chunks confirmed in the cloud within this long (docs/FORMAT.md,
    # "Retention"); None: off, dedup against everything the store knows.
    dedup_horizon_s: float | None = None
    heartbeat_s: float = 600.0  # while a window stays open (agent/uplink/heartbeat.py)


@dataclass(frozen=True)
class Interval:
    start: datetime  # UTC, aware
    end: datetime
    rate_bps: float | None = None


@dataclass(frozen=True)
class DailyWindow:
    start_s: int  # seconds after 00:00 UTC
    end_s: int  # may be < start_s: the window crosses midnight
    rate_bps: float | None = None


@dataclass(frozen=True)
class CycleWindow:
    """Simulated contact windows: open for `open_s`, closed for `closed_s`, repeating."""

    open_s: float
    closed_s: float


@dataclass(frozen=True)
class TimetableEntry:
    """One rclone-style timetable entry: what holds from this moment until the next entry."""

    day: int | None  # 0 = Monday .. 6 = Sunday; None = every day
    at_s: int  # seconds after 00:00 UTC
    open: bool  # False ("off"): no window until the next entry
    rate_bps: float | None = None  # cap while open; None ("on"): no cap


@dataclass(frozen=True)
class TleSettings:
    """Predicted passes from orbital elements (agent/windows/tle.py)."""

    files: tuple[Path, ...]
    latitude_deg: float
    longitude_deg: float
    altitude_m: float = 0.0
    satellites: tuple[str, ...] = ()  # name globs or catalog numbers; empty: every satellite
    min_elevation_deg: float = 10.0
    horizon_mask: tuple[tuple[float, float], ...] = ()  # (azimuth, minimum elevation), degrees
    rate_bps: float | None = None  # expected throughput during a pass
    stale_after_s: float = 14 * 86400.0  # older elements raise a warning


@dataclass(frozen=True)
class LinkSettings:
    """The link monitor (agent/windows/linkmonitor.py)."""

    probe: str = "auto"  # "auto", "none", file:///path, tcp://host:port, http(s)://host[:port]/
    interval_s: float = 5.0
    timeout_s: float = 2.0
    down_after: int = 2  # consecutive failed probes before the link counts as down
    up_after: int = 2  # consecutive good probes before it counts as up again
    learn: bool = True  # keep the learned availability model (agent/windows/learned.py)


@dataclass(frozen=True)
class WindowSettings:
    mode: WindowMode = "always"
    intervals: tuple[Interval, ...] = ()
    daily: tuple[DailyWindow, ...] = ()
    cycle: CycleWindow | None = None
    timetable: tuple[TimetableEntry, ...] = ()
    timetable_file: Path | None = None
    tle: TleSettings | None = None
    link: LinkSettings = field(default_factory=LinkSettings)
    pre_pass_s: float = 30.0  # before a window: probe the link, warm up connections
    post_pass_s: float = 0.0  # end of a window kept for draining and commits: no new chunk
    min_viable_contact_s: float = 0.0  # shorter predicted passes are ignored


@dataclass(frozen=True)
class TelemetrySettings:
    log_level: str = "info"
    log_format: Literal["auto", "json", "text"] = "auto"
    metrics_listen: tuple[str, int] | None = None  # (host, port) of the Prometheus endpoint


MqttProtocol = Literal["5", "3.1.1"]


@dataclass(frozen=True)
class MqttSubscription:
    topic: str  # an MQTT topic filter (+ and # wildcards)
    qos: int = 1  # 0 or 1: QoS 2 publications arrive as QoS 1 (see agent/sources/mqtt.py)
    priority: str = "normal"


@dataclass(frozen=True)
class MqttBatching:
    """When a class's batch of messages is sealed into one object: whichever comes first."""

    max_bytes: int = 1 << 20
    max_messages: int = 200  # bounds what a crash can duplicate (unacked at the kill)
    max_age_s: float = 5.0


@dataclass(frozen=True)
class MqttTls:
    ca_file: Path | None = None  # None: the system trust store
    cert_file: Path | None = None  # client certificate (mutual TLS)
    key_file: Path | None = None
    insecure: bool = False  # skip host-name verification (test brokers only)


@dataclass(frozen=True)
class MqttStatusSettings:
    publish: bool = True  # retained status on skyferry/<site>/status, events on .../events
    interval_s: float = 10.0
    commands: bool = True  # accept pause/resume/flush/priority on skyferry/<site>/cmd
    topic_prefix: str = "skyferry"
    # Commands are obeyed only when signed by one of these Ed25519 public keys (operator.pub
    # from `skyferry keygen --operator`), and only within command_max_age of their timestamp.
    operator_keys: tuple[Path, ...] = ()
    command_max_age_s: float = 300.0


@dataclass(frozen=True)
class MqttSettings:
    """The site broker: MQTT in (subscriptions, batching) and out (status, commands)."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: MqttProtocol = "5"
    client_id: str = ""  # fixed, so the broker keeps the session; default skyferry-<site>
    source: str = "mqtt"  # source name in manifests; restore writes <site>/mqtt/<source>/
    username: str | None = None
    password: SecretRef | None = None
    tls: MqttTls | None = None
    keepalive_s: float = 15.0
    session_expiry_s: float = 7 * 86400.0
    max_inflight: int = 2000  # unacknowledged messages the broker may send us (v5)
    max_message_bytes: int = 16 << 20  # larger payloads are refused (and never sent, in v5)
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 60.0
    subscriptions: tuple[MqttSubscription, ...] = ()
    batching: MqttBatching = field(default_factory=MqttBatching)
    class_batching: tuple[tuple[str, MqttBatching], ...] = ()  # per-class overrides
    status: MqttStatusSettings = field(default_factory=MqttStatusSettings)

    def batching_for(self, cls: str) -> MqttBatching:
        for name, b in self.class_batching:
            if name == cls:
                return b
        return self.batching


@dataclass(frozen=True)
class Settings:
    site: SiteSettings
    keys: KeySettings
    backend: BackendSettings
    put: PutSettings
    store: StoreSettings = field(default_factory=StoreSettings)
    classes: tuple[ClassSettings, ...] = ()
    chunking: ChunkingSettings = field(default_factory=ChunkingSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    spools: tuple[SpoolSettings, ...] = ()
    uplink: UplinkSettings = field(default_factory=UplinkSettings)
    windows: WindowSettings = field(default_factory=WindowSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    mqtt: MqttSettings | None = None  # None: no [mqtt] section, no broker at all

    def class_named(self, name: str) -> ClassSettings:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(name)
