"""One thin interface over obstore for every object storage the agent can write to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import LocalStore, ObjectStore

from agent.errors import BackendError, ObjectNotFoundError, PermanentBackendError


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Backend:
    """Keys are relative to the URL's prefix; the object store does the transport."""

    def __init__(self, store: ObjectStore, url: str, prefix: str = "") -> None:
        self._store = store
        self.url = url
        self.prefix = prefix.strip("/")

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _strip(self, path: str) -> str:
        return path[len(self.prefix) + 1:] if self.prefix else path

    def _fail(self, op: str, key: str, e: Exception) -> BackendError:
        if isinstance(e, NotFoundError | FileNotFoundError):
            return ObjectNotFoundError(f"{self.url}: {op} {key}: no such object")
        if isinstance(e, PermissionDeniedError | UnauthenticatedError):
            return PermanentBackendError(
                f"{self.url}: {op} {key} was refused ({type(e).__name__}); check the "
                "backend credentials and permissions")
        return BackendError(f"{self.url}: {op} {key} failed: {str(e).splitlines()[0]}")

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create-only write. True if written now, False if an object of that size was there."""
        try:
            await obstore.put_async(self._store, self._full(key), data, mode="create")
            return True
        except AlreadyExistsError:
            size = await self.size(key)
            if size != len(data):
                raise BackendError(
                    f"{self.url}: {key} already exists with {size} bytes, expected {len(data)}: "
                    "a partial or foreign object; delete it so it can be re-sent") from None
            return False
        except Exception as e:
            raise self._fail("put", key, e) from e

    async def get(self, key: str) -> bytes:
        try:
            result = await obstore.get_async(self._store, self._full(key))
            return bytes(await result.bytes_async())
        except Exception as e:
            raise self._fail("get", key, e) from e

    async def size(self, key: str) -> int | None:
        try:
            meta = await obstore.head_async(self._store, self._full(key))
        except (NotFoundError, FileNotFoundError):
            return None
        except Exception as e:
            raise self._fail("head", key, e) from e
        return int(meta["size"])

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        try:
            async for batch in obstore.list(self._store, prefix=self._full(prefix)):
                for meta in batch:
                    yield ObjectInfo(self._strip(meta["path"]), int(meta["size"]))
        except Exception as e:
            raise self._fail("list", prefix, e) from e

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self._store, self._full(key))
        except Exception as e:
            raise self._fail("delete", key, e) from e


def open_backend(url: str) -> Backend:
    """Build the backend a URL names: file:///path (S3, Azure and GCS come with issue 3)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise PermanentBackendError(f"{url}: file URLs take an absolute path: file:///path")
        root = Path(unquote(parsed.path))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermanentBackendError(f"{url}: cannot create {root}: {e.strerror}") from None
        return Backend(LocalStore(root, mkdir=True), url)
    raise PermanentBackendError(
        f"{url}: unsupported backend scheme {parsed.scheme!r}; use file:///path")
