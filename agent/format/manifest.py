"""The manifest: what one ingested object is made of. JSON, signed, then sealed like a chunk."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from agent.errors import FormatError, UnsafePathError

MANIFEST_VERSION = 2  # 2: numbered (`stream`, `seq`; agent/store/seqbook.py)
READABLE_VERSIONS = (1, 2)
STREAM_ID = re.compile(r"[0-9a-f]{32}")
KIND_FILE = "file"
KIND_MQTT_BATCH = "mqtt-batch"  # JSON Lines of MQTT messages (docs/FORMAT.md)
KIND_FILE_PACK = "file-pack"  # small files of one source, one after another (docs/FORMAT.md)
NAME_MAX = 255  # bytes of one path component (Linux filesystems' limit)
# Restore's temporary files are named TEMP_PREFIX + 32 random hex digits
# (agent/cloud/restore_fs.py);
# no object may carry such a name, so none can ever meet one.
TEMP_PREFIX = ".skyferry-tmp-"
TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[0-9a-f]{32}")


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then randomness."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | rand & ((1 << 80) - 1)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))


@dataclass(frozen=True)
class ChunkRef:
    id: str  # keyed chunk id (object key in the cloud)
    offset: int
    length: int
    hash: str  # unkeyed BLAKE3 of the plaintext


@dataclass(frozen=True)
class PackEntry:
    """One file of a file pack: bytes [offset, offset + size) of the pack's content."""

    name: str  # relative POSIX path, as given by the source
    offset: int
    size: int
    mtime_ns: int
    hash: str  # unkeyed BLAKE3 of the file


@dataclass(frozen=True)
class Manifest:
    object_id: str
    site: str
    source: str
    kind: str  # KIND_FILE, KIND_FILE_PACK or KIND_MQTT_BATCH
    name: str  # relative POSIX path, as given by the source
    size: int
    mtime_ns: int
    hash: str  # unkeyed BLAKE3 of the whole object
    priority: str
    created: str  # ISO-8601 UTC
    chunks: tuple[ChunkRef, ...]
    meta: dict[str, str] = field(default_factory=dict)
    version: int = 1  # the pipeline numbers what it signs: version 2 (`numbered`)
    entries: tuple[PackEntry, ...] = ()  # the files of a KIND_FILE_PACK, in content order
    # Version 2: the site's numbering of its manifests (docs/FORMAT.md, "History"); version 1
    # manifests have none ("" and 0).
    stream: str = ""
    seq: int = 0
    # The site's dedup horizon in seconds (docs/FORMAT.md, "Retention"); 0: none declared, and
    # then the field is left out of the body.
    horizon: int = 0

    def numbered(self, stream: str, seq: int, created: str) -> Manifest:
        """This manifest as version 2, numbered `seq` in `stream`, created at `created`."""
        return replace(self, version=MANIFEST_VERSION, stream=stream, seq=seq, created=created)

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.created)

    def to_json(self) -> bytes:
        # Built by hand: dataclasses.asdict deep-copies, ~60 us per entry of a 4096-file pack.
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["meta"] = dict(self.meta)
        data["chunks"] = [{"id": c.id, "offset": c.offset, "length": c.length, "hash": c.hash}
                          for c in self.chunks]
        if self.entries:
            data["entries"] = [{"name": e.name, "offset": e.offset, "size": e.size,
                                "mtime_ns": e.mtime_ns, "hash": e.hash} for e in self.entries]
        else:
            del data["entries"]  # single objects keep the original field set
        if self.version < 2:
            del data["stream"], data["seq"]  # version 1 has no numbering
        if not self.horizon:
            del data["horizon"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"manifest is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise FormatError("manifest must be a JSON object")
        version = data.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise FormatError(
                f"manifest version {version!r} is not supported "
                f"(this skyferry reads {', '.join(map(str, READABLE_VERSIONS))})"
            )
        _check_types(data, _FIELD_TYPES, "manifest")
        _check_numbering(data)
        if not isinstance(data.get("chunks"), list):
            raise FormatError("manifest field 'chunks' must be a list")
        for c in data["chunks"]:
            if not isinstance(c, dict):
                raise FormatError("manifest chunk entries must be objects")
            _check_types(c, _CHUNK_TYPES, "chunk")
        entries = data.pop("entries", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise FormatError("manifest field 'entries' must be a list of objects")
        for entry in entries:
            _check_types(entry, _ENTRY_TYPES, "entry")
        try:
            chunks = tuple(ChunkRef(**_only(c, ChunkRef)) for c in data.pop("chunks"))
            packed = tuple(PackEntry(**_only(x, PackEntry)) for x in entries)
            m = cls(chunks=chunks, entries=packed, **_only(data, cls))
        except (TypeError, KeyError) as e:
            raise FormatError(f"manifest is missing or has malformed fields: {e}") from None
        m.check()
        return m

    def check(self) -> None:
        """Structural checks that do not need the payload."""
        pos = 0
        for i, c in enumerate(self.chunks):
            if c.offset != pos or c.length <= 0:
                raise FormatError(
                    f"manifest {self.object_id}: chunk {i} at offset {c.offset} length {c.length}"
                    f" does not continue at {pos}"
                )
            pos += c.length
        if pos != self.size:
            raise FormatError(
                f"manifest {self.object_id}: chunks cover {pos} bytes but size is {self.size}"
            )
        if (self.kind == KIND_FILE_PACK) != bool(self.entries):
            raise FormatError(f"manifest {self.object_id}: only a {KIND_FILE_PACK} has entries, "
                              "and it must have at least one")
        pos = 0
        for i, e in enumerate(self.entries):
            if e.offset != pos or e.size < 0:
                raise FormatError(f"manifest {self.object_id}: entry {i} at offset {e.offset} "
                                  f"size {e.size} does not continue at {pos}")
            try:
                validate_name(e.name)
            except UnsafePathError as err:
                raise FormatError(f"manifest {self.object_id}: entry {i}: {err}") from None
            pos += e.size
        if self.entries and pos != self.size:
            raise FormatError(
                f"manifest {self.object_id}: entries cover {pos} bytes but size is {self.size}")


def _check_numbering(data: dict[str, Any]) -> None:
    """Version 2 carries `stream` and `seq`; version 1 has none (any such field is ignored)."""
    if data["version"] == 1:
        data.pop("stream", None)
        data.pop("seq", None)
        return
    stream, seq = data.get("stream"), data.get("seq")
    if not isinstance(stream, str) or not STREAM_ID.fullmatch(stream):
        raise FormatError(f"manifest version 2 needs 'stream' (32 hex digits), not {stream!r}")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq < 1 << 63:
        raise FormatError(f"manifest version 2 needs 'seq' (an integer >= 1), not {seq!r}")


def check_name(name: str) -> PurePosixPath:
    """A relative POSIX name that stays below any folder it is joined to, or UnsafePathError."""
    validate_name(name)
    return PurePosixPath(name)


def validate_name(name: str) -> None:
    """`check_name` without building the path (ingest checks thousands of names a second)."""
    if (not name or "\x00" in name or name.startswith("/")
            or any(part in ("..", ".", "") for part in name.split("/"))):
        raise UnsafePathError(
            f"unsafe path {name!r}: names must be relative, without '.', '..' or empty parts")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"name {name!r} is not valid UTF-8") from None
    if len(raw) > NAME_MAX or TEMP_PREFIX in name:
        _check_components(name)


def _check_components(name: str) -> None:
    """The rules for single components, only for names that might break them."""
    shown = repr(name) if len(name) <= 80 else f"{name[:77]!r}..."
    for part in name.split("/"):
        size = len(part.encode("utf-8"))
        if size > NAME_MAX:
            raise UnsafePathError(
                f"name {shown}: a component is {size} bytes in UTF-8; filesystems take at "
                f"most {NAME_MAX}, so it could never be restored: rename it (or give a "
                "shorter --name)")
        if TEMP_NAME.fullmatch(part):
            raise UnsafePathError(
                f"name {shown}: {part!r} has the form restore's temporary files take "
                f"({TEMP_PREFIX}<32 hex digits>): rename it")


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "object_id": str, "site": str, "source": str, "kind": str, "name": str, "size": int,
    "mtime_ns": int, "hash": str, "priority": str, "created": str, "meta": dict, "version": int,
    "horizon": int,
}
_CHUNK_TYPES: dict[str, type] = {"id": str, "offset": int, "length": int, "hash": str}
_ENTRY_TYPES: dict[str, type] = {"name": str, "offset": int, "size": int, "mtime_ns": int,
                                 "hash": str}


def _check_types(data: dict[str, Any], types: dict[str, Any], what: str) -> None:
    for name, typ in types.items():
        if name in data and (not isinstance(data[name], typ) or isinstance(data[name], bool)):
            raise FormatError(f"{what} field {name!r} has the wrong type "
                              f"({type(data[name]).__name__})")


def _only(data: Any, cls: type) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"expected an object for {cls.__name__}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
