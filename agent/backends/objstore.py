"""One thin adapter over obstore, shared by every service (agent/backends/<service>.py).

obstore's own retry loop is switched off (`max_retries = 0`): the caller's tenacity policy
(agent/backends/retry.py) is the one in charge, so every attempt is counted by kind in metrics,
no attempt runs while the gate is closed, and a request is never retried for minutes out of
sight inside the library.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
from obstore.store import ObjectStore

from agent.backends.connections import Connection, connections_to
from agent.backends.failures import Failures, detail
from agent.backends.protocol import CHECK_PREFIX, ObjectInfo, PutResult, Tagged, check_metadata
from agent.backends.resumable import ResumableUploads
from agent.config.settings import BackendSettings
from agent.errors import (
    BackendError,
    ObjectConflictError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PermanentBackendError,
    TransientBackendError,
)

if TYPE_CHECKING:
    from obstore import Attributes, PutMode
    from obstore.store import ClientConfig, RetryConfig

# A service's store: (the obstore store, where its credentials came from).
StoreMaker = Callable[[BackendSettings, str, Mapping[str, str], "ClientConfig", "RetryConfig"],
                      tuple[ObjectStore, str]]

T = TypeVar("T")

# Largest object a get may fetch at min_rate before obstore's own backstop gives up; chunks are
# at most 16 MiB sealed, manifests far smaller.
_LARGEST_GET = 32 << 20
CONNECTIONS_TTL_S = 0.1  # `connections` reads the kernel's table at most this often
# A plain object larger than this goes as a multipart upload of parts this size (S3's smallest
# part is 5 MiB; 10,000 parts of 8 MiB make 78 GiB), PART_STREAMS parts at a time: at most
# 32 MiB of it in memory.
PART_SIZE = 8 << 20
PART_STREAMS = 4
# What obstore reads back as attributes but are HTTP headers, not user metadata.
_STANDARD_ATTRIBUTES = frozenset({"Content-Disposition", "Content-Encoding", "Content-Language",
                                  "Content-Type", "Cache-Control", "Storage-Class"})


class ObstoreBackend:
    """The `Backend` every service shares: keys are relative to the URL's prefix, obstore does
    the transport; the service module only builds the obstore store."""

    def __init__(self, store: ObjectStore, url: str, prefix: str = "", *,
                 credentials: str = "none", where: str = "folder",
                 timeout_s: float = 30.0, min_rate_bps: float = 8000.0,
                 put_store: ObjectStore | None = None,
                 rebuild: Callable[[], tuple[ObjectStore, ObjectStore]] | None = None,
                 port: int | None = None, part_size: int = PART_SIZE) -> None:
        self._store = store
        self.part_size = part_size
        self.port = port  # the service's TCP port (None: a folder), for `connections`
        self._conns: list[Connection] | None = None
        self._conns_at = -CONNECTIONS_TTL_S
        # Uploads go through a client without a per-read timeout (see client_options).
        self._put_store = put_store or store
        self._rebuild = rebuild
        self.url = url
        self.prefix = prefix.strip("/")
        self.credentials = credentials  # where the credentials came from, for error messages
        self.where = where  # "container x", "bucket y": what a 404 on a write means is missing
        self.timeout_s = timeout_s
        self.min_rate_bps = min_rate_bps
        # Set by a service whose API can resume an upload (agent/backends/resumable.py):
        # larger objects go through it, in parts, sending only what the service lacks.
        self.resumable: ResumableUploads | None = None

    def renew(self) -> None:
        """Drop idle pooled connections: later requests open new ones.

        After an outage, an idle connection may have been closed by the far end without the
        close getting through; the first request on it would fail. Requests under way keep
        their connections.
        """
        if self.resumable is not None:
            self.resumable.renew()
        if self._rebuild is None:
            return
        try:
            self._store, self._put_store = self._rebuild()
        except Exception:  # keep the working store; the next renew tries again
            return

    def connections(self) -> list[Connection] | None:
        """This process's TCP connections to the service with data under way; None: unknown.

        Read from /proc at most every CONNECTIONS_TTL_S: every uplink worker asks before each
        chunk, and a busy host's TCP table is long.
        """
        if self.port is None:
            return None
        now = time.monotonic()
        if now - self._conns_at >= CONNECTIONS_TTL_S:
            self._conns, self._conns_at = connections_to(self.port), now
        return self._conns

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _strip(self, path: str) -> str:
        return path[len(self.prefix) + 1:] if self.prefix else path

    def _fail(self, op: str, key: str, e: BaseException) -> BackendError:
        return Failures(self.url, self.where, self.credentials).map(op, key, e)

    async def _bounded(self, coro: Coroutine[Any, Any, T], nbytes: int) -> T:
        """Give a transfer `timeout + n / min_rate`: a stalled link fails it, a slow one not.

        Cancelling the obstore future aborts its HTTP request, so the connection is dropped.
        """
        async with asyncio.timeout(self.timeout_s + nbytes / self.min_rate_bps):
            return await coro

    async def put_if_absent(self, key: str, data: bytes, probe_first: bool = False) -> bool:
        """Create-only, verified write. True if written now, False if it was already there.

        `probe_first` (used on retries): look before sending, so an upload whose
        acknowledgement was lost on a cut is not sent a second time.
        """
        result = await self.put_new(key, data, probe_first)
        if result.written:
            await self.verify_written(key, len(data), result.etag)
        return result.written

    async def put_new(self, key: str, data: bytes, probe_first: bool = False) -> PutResult:
        """Create-only write, not yet read back: `verify_written` completes it.

        Split from `put_if_absent` so the uplink can read one chunk back while the next one
        is already on the wire (on a long path the read-back is one more round trip).
        """
        if probe_first and await self.size(key) == len(data):
            return PutResult(False)
        full = self._full(key)
        if self.resumable is not None and len(data) > self.resumable.threshold:
            resumed = await self.resumable.put_new(full, key, data, self._bounded)
            if resumed is None:
                await self._check_existing(key, len(data))
                return PutResult(False)
            return resumed
        try:
            # One request, no multipart: a chunk is at most 16 MiB, create-only conditions
            # apply to a plain PUT everywhere, and an interrupted PUT leaves nothing behind.
            result = await self._bounded(
                obstore.put_async(self._put_store, full, data, mode="create",
                                  use_multipart=False),
                len(data))
        except AlreadyExistsError:
            await self._check_existing(key, len(data))
            return PutResult(False)
        except Exception as e:
            raise self._fail("put", key, e) from e
        return PutResult(True, result.get("e_tag"))

    async def _check_existing(self, key: str, size: int) -> None:
        """Someone (an earlier attempt, most likely) stored this key: is it the same object?"""
        found = await self.size(key)
        if found is None:
            raise TransientBackendError(
                f"{self.url}: {key} was reported as existing but is gone; will retry",
                "conflict")
        if found != size:
            raise ObjectConflictError(
                f"{self.url}: {key} already exists with {found} bytes, expected {size}: a "
                "foreign or damaged object; move it away so it can be re-sent", "conflict")

    async def verify_written(self, key: str, size: int, etag: str | None) -> None:
        """Read back what the service stored: the size, and the ETag we were given.

        On a mismatch the object (ours: `put_new` just created it) is removed and a
        `TransientBackendError` of kind "verify" raised: send it again.
        """
        try:
            meta = await self._bounded(obstore.head_async(self._store, self._full(key)), 0)
        except Exception as e:
            raise self._fail("head", key, e) from e
        stored, stored_etag = int(meta["size"]), meta.get("e_tag")
        if stored == size and (etag is None or stored_etag is None or stored_etag == etag):
            return
        # We just created it, so it is ours to remove; the retry sends it again.
        try:
            await obstore.delete_async(self._store, self._full(key))
        except Exception as e:
            raise self._fail("delete", key, e) from e
        raise TransientBackendError(
            f"{self.url}: {key} was stored as {stored} bytes (etag {stored_etag}), sent {size} "
            f"(etag {etag}); removed it, will re-send", "verify")

    async def get(self, key: str, max_size: int | None = None) -> bytes:
        return bytes(await self.get_buffer(key, max_size))

    async def get_buffer(self, key: str, max_size: int | None = None) -> memoryview:
        """`max_size`: a larger object is refused unread (its size comes with the response)."""
        try:
            result = await obstore.get_async(self._store, self._full(key))
            size = int(result.meta["size"])
            if max_size is None or size <= max_size:
                return memoryview(await result.bytes_async())
        except Exception as e:
            raise self._fail("get", key, e) from e
        raise ObjectTooLargeError(f"{key} is {size} bytes, more than the {max_size} the format "
                                  "allows there: not read")

    async def get_tagged(self, key: str, max_size: int | None = None) -> Tagged | None:
        try:
            result = await obstore.get_async(self._store, self._full(key))
            size, etag = int(result.meta["size"]), result.meta.get("e_tag")
            if max_size is not None and size > max_size:
                raise ObjectTooLargeError(f"{key} is {size} bytes, more than the {max_size} "
                                          "allowed there: not read")
            data = bytes(await result.bytes_async())
        except ObjectTooLargeError:
            raise
        except Exception as e:
            failure = self._fail("get", key, e)
            if isinstance(failure, ObjectNotFoundError):
                return None
            raise failure from e
        if etag is None:
            raise PermanentBackendError(f"{self.url}: get {key}: the service gave no ETag, "
                                        "which compare-and-swap needs", "rejected")
        return Tagged(data, etag)

    async def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        """If-Match (If-None-Match: * for None) on one PUT: S3, Azure and GCS all keep it."""
        mode: PutMode = "create" if etag is None else {"e_tag": etag}
        try:
            await self._bounded(obstore.put_async(self._put_store, self._full(key), data,
                                                  mode=mode, use_multipart=False), len(data))
        except (AlreadyExistsError, PreconditionError, NotFoundError):
            return False  # changed, created or removed meanwhile (a 404 on If-Match: gone)
        except Exception as e:
            failure = self._fail("put", key, e)
            if isinstance(failure, ObjectNotFoundError):
                return False
            raise failure from e
        return True

    async def size(self, key: str) -> int | None:
        meta = await self._unless_missing(
            key, lambda: obstore.head_async(self._store, self._full(key)))
        return None if meta is None else int(meta["size"])

    async def _unless_missing(self, key: str,
                              request: Callable[[], Coroutine[Any, Any, T]]) -> T | None:
        """A HEAD-like request's answer; None when the object does not exist. The request is
        made inside, so a refusal raised while making it is mapped like any other."""
        try:
            return await self._bounded(request(), 0)
        except (NotFoundError, FileNotFoundError):
            return None
        except Exception as e:
            failure = self._fail("head", key, e)
            if isinstance(failure, ObjectNotFoundError):
                return None
            raise failure from e

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        try:
            async for batch in obstore.list(self._store, prefix=self._full(prefix)):
                for meta in batch:
                    yield ObjectInfo(self._strip(meta["path"]), int(meta["size"]),
                                     meta["last_modified"].timestamp())
        except Exception as e:
            raise self._fail("list", prefix, e) from e

    async def list_folders(self, prefix: str) -> tuple[str, ...]:
        full = self._full(prefix).rstrip("/")
        try:
            found = await obstore.list_with_delimiter_async(self._store, prefix=full or None)
        except Exception as e:
            raise self._fail("list", prefix, e) from e
        return tuple(sorted(self._strip(p).rstrip("/")[len(prefix):]
                            for p in found["common_prefixes"]))

    async def check(self) -> None:
        """One cheap authenticated request: list a prefix nothing is ever written under.

        Unlike a HEAD of a missing key (404 whether or not the container exists), a listing
        needs the container or bucket to exist and the credentials to be accepted: a wrong
        container raises PermanentBackendError "not_found", a wrong key "auth"; a link that is
        down raises TransientBackendError. Nothing is written.
        """
        try:
            async with asyncio.timeout(self.timeout_s):
                stream = obstore.list(self._store, prefix=self._full(CHECK_PREFIX), chunk_size=1)
                async for _ in stream:
                    break
        except Exception as e:
            failure = self._fail("list", CHECK_PREFIX, e)
            if not (isinstance(failure, PermanentBackendError) and failure.kind == "auth"):
                raise failure from e
            # Listing may be all these credentials lack (an Azure SAS without "l"): a HEAD
            # of a missing key is answered 404 when the key itself is accepted.
            if not await self._missing(CHECK_PREFIX + "probe"):
                raise failure from e

    async def _missing(self, key: str) -> bool:
        """True when the service says `key` does not exist (and so accepted the request)."""
        try:
            await self._bounded(obstore.head_async(self._store, self._full(key)), 0)
        except Exception as e:
            return isinstance(self._fail("head", key, e), ObjectNotFoundError)
        return False

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self._store, self._full(key))
        except Exception as e:
            raise self._fail("delete", key, e) from e

    async def put_plain(self, key: str, source: Path | bytes, *, metadata: Mapping[str, str],
                        mtime_ns: int | None = None, consume: bool = False) -> None:
        """Write or replace a plain object (`Backend.put_plain`; `mtime_ns`, `consume` do not
        apply). obstore names any attribute other than the standard HTTP ones user metadata. A
        source over `part_size` goes as a multipart upload (S3 multipart, Azure blocks + block
        list, GCS XML multipart), visible only when complete; an aborted one leaves no object
        (S3 and GCS may keep its parts until a lifecycle rule removes them)."""
        check_metadata(self.url, key, metadata)
        attributes: Attributes = dict(metadata)
        try:
            size = len(source) if isinstance(source, bytes) else source.stat().st_size
            await self._bounded(
                obstore.put_async(self._put_store, self._full(key), source,
                                  attributes=attributes, mode="overwrite",
                                  use_multipart=size > self.part_size,
                                  chunk_size=self.part_size, max_concurrency=PART_STREAMS),
                size)
        except Exception as e:
            raise self._fail("put", key, e) from e

    async def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        """A HEAD request (a get with `head`): obstore's `head` does not return attributes."""
        result = await self._unless_missing(
            key, lambda: obstore.get_async(self._store, self._full(key), options={"head": True}))
        if result is None:
            return None
        metadata = {str(k): v for k, v in result.attributes.items()
                    if k not in _STANDARD_ATTRIBUTES}
        return int(result.meta["size"]), metadata


def client_options(s: BackendSettings, uploads: bool = False) -> ClientConfig:
    options: ClientConfig = {
        "allow_http": s.allow_http,
        "connect_timeout": timedelta(seconds=s.connect_timeout_s),
        # Uploads get their own size-aware deadline (Backend._bounded); this is only the
        # backstop obstore applies to every request.
        "timeout": timedelta(seconds=s.timeout_s + _LARGEST_GET / s.min_rate_bps),
        "user_agent": "skyferry",
    }
    if not uploads:
        # A download that stops delivering bytes for `timeout` is stalled. Not for uploads:
        # nothing is read until the whole body is out, so every upload taking longer than
        # `timeout` to send (16 MiB shared by 4 streams at 15 Mbit/s: ~36 s) would fail, and
        # fail again on every retry.
        options["read_timeout"] = timedelta(seconds=s.timeout_s)
    return options


def service_port(endpoint: str | None) -> int | None:
    """The TCP port requests go to: the endpoint's, else HTTPS to the public service."""
    if not endpoint:
        return 443
    parts = urlsplit(endpoint)
    try:
        return parts.port or (80 if parts.scheme.lower() == "http" else 443)
    except ValueError:  # a malformed port: obstore has refused it already
        return None


def open_cloud(settings: BackendSettings, parts: SplitResult, environ: Mapping[str, str],
               make: StoreMaker, place: str) -> ObstoreBackend:
    """The backend on container or bucket `parts.netloc` of a service whose store `make`
    builds; `place` is what the service calls it ("container", "bucket")."""
    name, prefix = parts.netloc, unquote(parts.path).strip("/")
    if not name:
        raise PermanentBackendError(f"{settings.url}: no container or bucket name", "config")
    client = client_options(settings)
    put_client = client_options(settings, uploads=True)
    retry: RetryConfig = {"max_retries": 0}

    def rebuild() -> tuple[ObjectStore, ObjectStore]:
        """The stores (reads, uploads) with new connection pools (renew)."""
        return (make(settings, name, environ, client, retry)[0],
                make(settings, name, environ, put_client, retry)[0])

    try:
        store, creds = make(settings, name, environ, client, retry)
        put_store = make(settings, name, environ, put_client, retry)[0]
    except BackendError:
        raise
    except Exception as e:  # obstore refuses a malformed key, endpoint or region here
        raise PermanentBackendError(
            f"{settings.url}: cannot set up the backend: {detail(str(e))}; check [backend]",
            "config") from None
    return ObstoreBackend(store, settings.url, prefix, credentials=creds,
                          where=f"{place} {name!r}", timeout_s=settings.timeout_s,
                          min_rate_bps=settings.min_rate_bps, put_store=put_store,
                          rebuild=rebuild, port=service_port(settings.endpoint))
