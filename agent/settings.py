"""Frozen, typed settings: what `agent.config` produces from the TOML file.

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

DEFAULT_CLASSES: tuple[str, ...] = ("critical", "high", "normal", "bulk")


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


@dataclass(frozen=True)
class StoreSettings:
    quota_bytes: int | None = None  # None: no quota beyond the disk itself


@dataclass(frozen=True)
class ChunkingSettings:
    min_size: int = 1 << 20
    avg_size: int = 4 << 20
    max_size: int = 16 << 20


@dataclass(frozen=True)
class CompressionSettings:
    level: int = 3
    sample_size: int = 64 << 10
    min_ratio: float = 0.95  # compress only when a sample shrinks below this fraction


@dataclass(frozen=True)
class SpoolSettings:
    name: str
    path: Path
    priority: str = "normal"
    settle_s: float = 2.0
    after: AfterIngest = "delete"
    done_dir: Path | None = None  # used when after == "move"; default <path>/done
    scan_interval_s: float = 1.0

    @property
    def effective_done_dir(self) -> Path:
        return self.done_dir if self.done_dir is not None else self.path / "done"


@dataclass(frozen=True)
class PutSettings:
    socket: Path
    priority: str = "normal"


@dataclass(frozen=True)
class BackendSettings:
    url: str  # file:///path[/prefix] (S3/Azure/GCS: issue 3)


@dataclass(frozen=True)
class UplinkSettings:
    streams: int = 4
    aging_s: float = 6 * 3600.0  # a waiting object climbs one class per aging period
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    rate_bps: float | None = None  # cap shared by all streams; a window's own rate may be lower


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
class WindowSettings:
    mode: WindowMode = "always"
    intervals: tuple[Interval, ...] = ()
    daily: tuple[DailyWindow, ...] = ()
    cycle: CycleWindow | None = None


@dataclass(frozen=True)
class TelemetrySettings:
    log_level: str = "info"
    log_format: Literal["auto", "json", "text"] = "auto"
    metrics_listen: tuple[str, int] | None = None  # (host, port) of the Prometheus endpoint


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

    def class_named(self, name: str) -> ClassSettings:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(name)
