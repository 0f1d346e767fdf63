"""What the rest of the agent may ask of an object store: the `Backend` protocol.

Keys are relative to the URL's prefix. Every failure is one of agent.errors' `BackendError`
classes (`TransientBackendError`: retry; `PermanentBackendError`: retrying cannot help;
`ObjectNotFoundError`; `ObjectConflictError`), each with a `kind` for metrics.
tests/system/test_backend_conformance.py holds every implementation to this contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from agent.backends.connections import Connection

CHECK_PREFIX = ".skyferry-check/"  # `Backend.check` lists it; nothing is written there


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
