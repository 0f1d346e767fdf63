"""What the rest of the agent may ask of an object store: the `Backend` protocol.

Keys are relative to the URL's prefix. Every failure is one of agent.errors' `BackendError`
classes (`TransientBackendError`: retry; `PermanentBackendError`: retrying cannot help;
`ObjectNotFoundError`; `ObjectConflictError`), each with a `kind` for metrics.
tests/system/test_backend_conformance.py holds every implementation to this contract.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.backends.connections import Connection
from agent.errors import PermanentBackendError

CHECK_PREFIX = ".skyferry-check/"  # `Backend.check` lists it; nothing is written there

# User metadata every service keeps as given: Azure wants C# identifiers, S3 and GCS lower-case
# names, HTTP headers printable ASCII values without surrounding blanks (trimmed in transit).
_METADATA_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_METADATA_VALUE_RE = re.compile(r"(?:[!-~](?:[ -~]{0,1022}[!-~])?)?")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


@dataclass(frozen=True)
class PutResult:
    written: bool  # False: the object was already there, with the expected size
    etag: str | None = None  # the service's ETag for what it stored (when written)


class Backend(Protocol):
    url: str
    prefix: str
    credentials: str  # where the credentials came from, for error messages
    where: str  # "container x", "bucket y", "folder z": what a 404 on a write means is missing
    port: int | None  # the service's TCP port (None: no network), for `connections`
    timeout_s: float
    min_rate_bps: float

    def renew(self) -> None:
        """Drop idle pooled connections: later requests open new ones."""

    def connections(self) -> list[Connection] | None:
        """This process's TCP connections to the service with data under way; None: unknown."""

    async def put_if_absent(self, key: str, data: bytes, probe_first: bool = False) -> bool:
        """Create-only, verified write. True if written now, False if it was already there."""

    async def put_new(self, key: str, data: bytes, probe_first: bool = False) -> PutResult:
        """Create-only write, not yet read back: `verify_written` completes it."""

    async def verify_written(self, key: str, size: int, etag: str | None) -> None:
        """Read back what the service stored; on a mismatch remove it and raise a transient
        error of kind "verify"."""

    async def get(self, key: str, max_size: int | None = None) -> bytes:
        """The object's bytes; a larger object than `max_size` is refused unread."""

    async def size(self, key: str) -> int | None:
        """The object's size, None when it does not exist."""

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `prefix`."""

    async def check(self) -> None:
        """One cheap authenticated request that writes nothing (agent/uplink/backend_check.py)."""

    async def delete(self, key: str) -> None:
        """Remove the object."""

    async def put_plain(self, key: str, source: Path | bytes, *, metadata: Mapping[str, str],
                        mtime_ns: int | None = None) -> None:
        """Write or replace a plain object (what `land` delivers): all of it or nothing, never a
        partial object visible to a lister. A source larger than the backend's part size (a
        Path: read from disk, never whole in memory) goes as a multipart upload. `metadata` is
        user metadata (Azure x-ms-meta-*, S3 x-amz-meta-*, GCS x-goog-meta-*; on a folder:
        xattrs user.skyferry.<name>), names and values as `check_metadata` allows. `mtime_ns`
        sets a folder file's modification time; object stores keep their own (the lander
        sends the original in `metadata`). Idempotent: retry it with `retrying`."""

    async def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        """Size and user metadata of an object, None when it does not exist."""


def check_metadata(url: str, key: str, metadata: Mapping[str, str]) -> None:
    """Refuse metadata some service would rename, mangle or reject, before anything is sent."""
    for name, value in metadata.items():
        if not _METADATA_NAME_RE.fullmatch(name):
            raise PermanentBackendError(
                f"{url}: put {key}: metadata name {name!r} is not portable: use lower-case "
                "ASCII letters, digits and _, starting with a letter", "rejected")
        if not _METADATA_VALUE_RE.fullmatch(value):
            raise PermanentBackendError(
                f"{url}: put {key}: metadata {name} = {value!r} is not portable: use printable "
                "ASCII without leading or trailing blanks, at most 1024 characters", "rejected")
