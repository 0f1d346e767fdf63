"""What is asked of the pipeline (a file, an in-memory batch, a pack of small files) and what
it answers."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import SourceError
from agent.format.manifest import KIND_MQTT_BATCH
from agent.store.store import Eviction

# Opens the source file and returns a descriptor the pipeline then owns (and closes).
Opener = Callable[[], int]


@dataclass(frozen=True)
class IngestRequest:
    """One file to ingest.

    `path` names it in messages. By default the pipeline opens `path` itself (never through a
    symbolic link). A source that must not open paths by name (a spool folder a producer
    controls, a descriptor passed over the put socket) gives `opener`, and `seen`: the file's
    status as the source saw it. The descriptor the opener returns must be that same file
    (device and inode) or the request is refused.
    """

    path: Path
    source: str
    name: str  # relative POSIX name kept in the manifest
    priority: str
    meta: dict[str, str] = field(default_factory=dict)
    opener: Opener | None = None
    seen: os.stat_result | None = None


@dataclass(frozen=True)
class BatchRequest:
    """An in-memory object (a batch of MQTT messages as JSON Lines), sealed like a file."""

    data: bytes
    source: str
    priority: str
    name_prefix: str  # the name is name_prefix + object id + name_suffix
    name_suffix: str
    mtime_ns: int  # receive time of the newest message
    kind: str = KIND_MQTT_BATCH
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestResult:
    object_id: str
    size: int
    chunks: int
    new_chunks: int
    stored_bytes: int  # sealed bytes this object added to the store
    duplicate_of: str | None = None  # set when the same source item was accepted before
    evicted: tuple[Eviction, ...] = ()


@dataclass(frozen=True)
class PackResult:
    """What became of each file offered to `ingest_pack`, by name."""

    object_id: str | None  # the new pack, None when nothing new was sealed
    accepted: dict[str, IngestResult]  # sealed into the pack, or accepted before
    failed: dict[str, SourceError]  # left at the source, with the reason
    size: int = 0  # bytes sealed into the pack
    chunks: int = 0
    new_chunks: int = 0
    stored_bytes: int = 0
    evicted: tuple[Eviction, ...] = ()
