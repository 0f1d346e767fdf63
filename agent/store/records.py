"""What the store hands out and takes in: staged ingests, units of upload work, evictions and
per-class summaries. Plain values; the store's parts (agent/store/*) fill and read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StagedChunk:
    id: str
    sealed_size: int
    plain_size: int
    sealed_hash: str


@dataclass
class StagedObject:
    """An ingest in progress: new chunk files sit in its staging folder until commit."""

    object_id: str
    source: str
    source_key: str | None
    priority: str
    size: int
    chunk_ids: list[str] = field(default_factory=list)  # in order, with repeats
    new_chunks: dict[str, StagedChunk] = field(default_factory=dict)
    manifest_bytes: int = 0
    manifest_hash: str = ""  # BLAKE3 of the sealed manifest file
    member_keys: list[str] = field(default_factory=list)  # source keys of a pack's files
    created: float | None = None  # the manifest's `created` (its cloud date folder), if set
    # Dedup horizon (agent/store/horizon.py): every chunk referenced has a local copy, so a
    # chunk past the horizon can be re-sent before the manifest.
    keep_copies: bool = False


@dataclass(frozen=True)
class ChunkWork:
    chunk_id: str
    path: Path
    sealed_size: int
    sealed_hash: str
    object_id: str
    priority: str
    manifest_bytes: int = 0  # of its object: a window budget keeps room to commit it


@dataclass(frozen=True)
class ManifestWork:
    object_id: str
    path: Path
    created: float
    priority: str
    manifest_bytes: int = 0
    manifest_hash: str = ""


Work = ChunkWork | ManifestWork


@dataclass(frozen=True)
class Eviction:
    object_id: str
    priority: str
    size: int
    reason: str  # "quota" or "ttl"


@dataclass
class ClassSummary:
    items: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    oldest_queued_age_s: float | None = None
