"""What the rest of the agent may ask of an object store: the `Backend` protocol.

Keys are relative to the URL's prefix. Every failure is one of agent.errors' `BackendError`
classes (`TransientBackendError`: retry; `PermanentBackendError`: retrying cannot help;
`ObjectNotFoundError`; `ObjectConflictError`), each with a `kind` for metrics.
tests/system/test_backend_conformance.py holds every implementation to this contract.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

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
    last_modified: float | None = None  # Unix seconds by the service's clock, when listed


@dataclass(frozen=True)
class Tagged:
    data: bytes
    etag: str  # the version read: `Backend.put_if_match` writes only over this one


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

    async def get_buffer(self, key: str, max_size: int | None = None) -> memoryview:
        """As `get`, as a read-only view of the client's own buffer: no copy into a bytes
        object (a chunk of up to 16 MiB, copied on the event loop's thread, held everything
        else up). For code that reads buffers: decryption, hashing."""

    async def size(self, key: str) -> int | None:
        """The object's size, None when it does not exist."""

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `prefix`."""

    async def list_folders(self, prefix: str) -> tuple[str, ...]:
        """The names of the "folders" directly below `prefix` (which ends with "/" or is
        empty): one delimiter listing, not every object below them."""

    async def check(self) -> None:
        """One cheap authenticated request that writes nothing (agent/uplink/backend_check.py)."""

    async def delete(self, key: str) -> None:
        """Remove the object."""

    async def put_plain(self, key: str, source: Path | bytes, *, metadata: Mapping[str, str],
                        mtime_ns: int | None = None, consume: bool = False) -> None:
        """Write or replace a plain object (what `land` delivers): all of it or nothing, never a
        partial object visible to a lister. A source larger than the backend's part size (a
        Path: read from disk, never whole in memory) goes as a multipart upload. `metadata` is
        user metadata (Azure x-ms-meta-*, S3 x-amz-meta-*, GCS x-goog-meta-*; on a folder:
        xattrs user.skyferry.<name>), names and values as `check_metadata` allows. `mtime_ns`
        sets a folder file's modification time; object stores keep their own (the lander
        sends the original in `metadata`). Idempotent: retry it with `retrying`. `consume`: the
        source file is the caller's to give away (it is never written again, only removed): a
        folder on the same file system may take it in place (a hard link) instead of a copy."""

    async def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        """Size and user metadata of an object, None when it does not exist."""

    async def get_tagged(self, key: str, max_size: int | None = None) -> Tagged | None:
        """The object's bytes and the tag of that version (what `put_if_match` compares),
        None when it does not exist; a larger object than `max_size` is refused unread."""

    async def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        """Compare-and-swap a small object: write `data` only while the object is still the
        version `etag` names (from `get_tagged`; None: only while there is none). True if
        written; False if another writer changed it first: read it again and decide again.
        One request, all or nothing. After a retried call returns False, the first attempt may
        have been the one that wrote: the caller reads back and compares, as after any loss."""


@dataclass(frozen=True)
class PlainPut:
    """One plain object for `GuardedPut.put_plain_guarded`: `source` is the caller's to give
    away (as `put_plain(consume=True)`)."""

    key: str
    source: Path
    metadata: Mapping[str, str]
    mtime_ns: int | None = None


@runtime_checkable
class GuardedPut(Protocol):
    """A backend that can put plain objects each only if what its key holds admits it, a batch
    in one step: a folder (one thread call per batch, each file's folder locked only to judge
    and rename, one fsync per file at the end) instead of a compare-and-swap on a separate
    record, a put, a HEAD and a read per file. `skyferry land` uses it where offered
    (agent/cloud/land_put.py)."""

    async def put_plain_guarded(
            self, puts: Sequence[PlainPut],
            admit: Callable[[PlainPut, Mapping[str, str] | None], bool]) -> list[bool]:
        """For each put in turn, `admit(put, the user metadata of what its key holds now, None
        if nothing)`, judged under a lock every such put of the key takes; if True, the object
        becomes the put's source with its metadata and mtime, whole or not at all; False:
        refused, nothing changed. Then what was put is made durable. Whether each was put."""

    async def make_durable(self, keys: Iterable[str]) -> None:
        """What was written under `keys` survives a crash from now on."""


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
