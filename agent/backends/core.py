"""One thin interface over obstore for every object storage the agent can write to.

`open_backend` turns `BackendSettings` (a URL plus the [backend] keys) into a `Backend`:
file:///path (LocalStore), azure://container/prefix (AzureStore), s3://bucket/prefix (S3Store),
gs://bucket/prefix (GCSStore). Every failure becomes one of the `BackendError` classes with a
`kind` for metrics: `TransientBackendError` (retry), `PermanentBackendError` (credentials,
permissions, missing container: retrying cannot help), `ObjectNotFoundError`,
`ObjectConflictError`.

obstore's own retry loop is switched off (`max_retries = 0`): the caller's tenacity policy is the
one in charge, so every attempt is counted by kind in metrics, no attempt runs while the gate is
closed, and a request is never retried for minutes out of sight inside the library.

obstore does not show its connections, so `Backend.connections` asks the kernel (Linux /proc)
about this process's TCP connections to the service: whether one waits out TCP's
retransmission backoff after a silent outage (agent/uplink/link_watch.py acts on that).
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import AzureStore, GCSStore, LocalStore, ObjectStore, S3Store
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from agent.config.settings import BackendSettings, SecretRef
from agent.errors import (
    BackendError,
    ObjectConflictError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PermanentBackendError,
    TransientBackendError,
)

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

T = TypeVar("T")

_STATUS_RE = re.compile(r"status code: (\d{3})")
_CODE_RE = re.compile(r"<Code>([A-Za-z]+)</Code>")
# obstore's debug text names the transport failure: Connect, Request, Timeout, Interrupted, ...
_HTTP_KIND_RE = re.compile(r"HttpError \{\s*kind: (\w+)")
# Largest object a get may fetch at min_rate before obstore's own backstop gives up; chunks are
# at most 16 MiB sealed, manifests far smaller.
_LARGEST_GET = 32 << 20
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")  # the emulator's published development key, not a secret


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


CHECK_PREFIX = ".skyferry-check/"  # `Backend.check` lists it; nothing is written there
CONNECTIONS_TTL_S = 0.1  # `Backend.connections` reads the kernel's table at most this often


@dataclass(frozen=True)
class PutResult:
    written: bool  # False: the object was already there, with the expected size
    etag: str | None = None  # the service's ETag for what it stored (when written)


def is_transient(e: BaseException) -> bool:
    return isinstance(e, TransientBackendError)


class Backend:
    """Keys are relative to the URL's prefix; the object store does the transport."""

    def __init__(self, store: ObjectStore, url: str, prefix: str = "", *,
                 credentials: str = "none", where: str = "folder",
                 timeout_s: float = 30.0, min_rate_bps: float = 8000.0,
                 put_store: ObjectStore | None = None,
                 rebuild: Callable[[], tuple[ObjectStore, ObjectStore]] | None = None,
                 port: int | None = None) -> None:
        self._store = store
        self.port = port  # the service's TCP port (None: a folder), for `connections`
        self._conns: list[Connection] | None = None
        self._conns_at = -CONNECTIONS_TTL_S
        # Uploads go through a client without a per-read timeout (see _client_options).
        self._put_store = put_store or store
        self._rebuild = rebuild
        self.url = url
        self.prefix = prefix.strip("/")
        self.credentials = credentials  # where the credentials came from, for error messages
        self.where = where  # "container x", "bucket y": what a 404 on a write means is missing
        self.timeout_s = timeout_s
        self.min_rate_bps = min_rate_bps

    def renew(self) -> None:
        """Drop idle pooled connections: later requests open new ones.

        After an outage, an idle connection may have been closed by the far end without the
        close getting through; the first request on it would fail. Requests under way keep
        their connections.
        """
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
        """Map what obstore (or the OS, for file://) raised to one of our error classes."""
        if isinstance(e, BackendError):
            return e
        text = str(e)
        detail = _detail(text)
        key = key or "/"  # a listing of the whole prefix
        status_m = _STATUS_RE.search(text)
        status = int(status_m[1]) if status_m else None
        if isinstance(e, TimeoutError):
            return TransientBackendError(
                f"{self.url}: {op} {key} timed out (no progress within the backend timeout "
                "and min_rate budget)", "timeout")
        if isinstance(e, NotFoundError | FileNotFoundError) or status == 404:
            if op in ("get", "head"):
                return ObjectNotFoundError(f"{self.url}: {op} {key}: no such object", "not_found")
            return PermanentBackendError(
                f"{self.url}: {op} {key} failed: the {self.where} does not exist or these "
                f"credentials ({self.credentials}) cannot see it ({detail}); create it, or fix "
                "url", "not_found")
        if isinstance(e, PermissionDeniedError | UnauthenticatedError | PermissionError) or (
                status in (401, 403)):
            return PermanentBackendError(
                f"{self.url}: {op} {key} was refused ({detail}): check the credentials "
                f"({self.credentials}) and their permissions on the {self.where}", "auth")
        if status is not None:
            if status in (429, 503):
                return TransientBackendError(
                    f"{self.url}: {op} {key}: the service is throttling ({detail})", "throttled")
            if status >= 500:
                return TransientBackendError(f"{self.url}: {op} {key}: server error ({detail})",
                                             "server_error")
            if status == 408:
                return TransientBackendError(f"{self.url}: {op} {key}: request timeout", "timeout")
            return PermanentBackendError(
                f"{self.url}: {op} {key} was rejected ({detail}); check the [backend] settings "
                "(region, endpoint)", "rejected")
        http_kind = _HTTP_KIND_RE.search(text)
        if http_kind and http_kind[1] == "Timeout":
            return TransientBackendError(f"{self.url}: {op} {key} timed out ({detail})", "timeout")
        if isinstance(e, BaseError | OSError):
            return TransientBackendError(f"{self.url}: {op} {key} failed: {detail}", "connection")
        return TransientBackendError(f"{self.url}: {op} {key} failed: {detail}", "backend")

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
        """The object's bytes; with `max_size`, a larger object is refused before its body is
        read (the size comes with the response's metadata)."""
        try:
            result = await obstore.get_async(self._store, self._full(key))
            size = int(result.meta["size"])
            if max_size is None or size <= max_size:
                return bytes(await result.bytes_async())
        except Exception as e:
            raise self._fail("get", key, e) from e
        raise ObjectTooLargeError(f"{key} is {size} bytes, more than the {max_size} the format "
                                  "allows there: not read")

    async def size(self, key: str) -> int | None:
        try:
            meta = await self._bounded(obstore.head_async(self._store, self._full(key)), 0)
        except (NotFoundError, FileNotFoundError):
            return None
        except Exception as e:
            failure = self._fail("head", key, e)
            if isinstance(failure, ObjectNotFoundError):
                return None
            raise failure from e
        return int(meta["size"])

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        try:
            async for batch in obstore.list(self._store, prefix=self._full(prefix)):
                for meta in batch:
                    yield ObjectInfo(self._strip(meta["path"]), int(meta["size"]))
        except Exception as e:
            raise self._fail("list", prefix, e) from e

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


@dataclass(frozen=True)
class Connection:
    """One of this process's TCP connections to the backend, as the kernel sees it."""

    queued: int  # bytes written but not yet acknowledged by the far end
    retransmits: int  # retransmission timeouts in a row without an acknowledgement
    next_retransmit_s: float  # until the kernel tries again (0: no timer pending)
    connecting: bool  # still in the handshake (SYN sent)

    @property
    def stalled(self) -> bool:
        """Waiting out TCP's retransmission backoff rather than moving bytes."""
        return (self.queued > 0 or self.connecting) and self.retransmits >= 1


_TCP_ESTABLISHED, _TCP_SYN_SENT = "01", "02"
_USER_HZ = 100  # /proc/net/tcp gives timer values in clock ticks


def connections_to(port: int, proc: Path = Path("/proc/self")) -> list[Connection] | None:
    """This process's TCP connections to `port` with data under way (Linux /proc).

    None when it cannot be told (no /proc): callers then assume nothing is stalled.
    """
    try:
        ours = {link[8:-1] for fd in os.listdir(proc / "fd")
                if (link := _readlink(proc / "fd" / fd)).startswith("socket:[")}
    except OSError:
        return None
    out: list[Connection] = []
    seen = False
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[9] not in ours or f[3] not in (_TCP_ESTABLISHED, _TCP_SYN_SENT):
                continue
            if int(f[2].rsplit(":", 1)[1], 16) != port:
                continue
            tx = int(f[4].split(":")[0], 16)
            connecting = f[3] == _TCP_SYN_SENT
            if tx == 0 and not connecting:
                continue  # idle (a pooled connection, or one awaiting its answer)
            timer, when = f[5].split(":")
            out.append(Connection(tx, int(f[6], 16),
                                  int(when, 16) / _USER_HZ if timer == "01" else 0.0,
                                  connecting))
    return out if seen else None


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # the descriptor was closed meanwhile
        return ""


def backoff(initial_s: float, max_s: float) -> wait_base:
    """Exponential backoff with "equal jitter": between half and all of initial * 2^n, capped.

    The random half keeps parallel streams that failed together from retrying in lockstep;
    the fixed half keeps a throttled service from being asked again almost at once.
    """
    half, cap = initial_s / 2, max_s / 2
    return wait_exponential(multiplier=half, max=cap) + wait_random_exponential(
        multiplier=half, max=cap)


async def retrying(fn: Callable[[], Awaitable[T]], attempts: int = 6, initial_s: float = 0.5,
                   max_s: float = 10.0) -> T:
    """Retry transient backend errors with exponential backoff and jitter (restore, verify)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=backoff(initial_s, max_s),
        stop=stop_after_attempt(attempts),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")


def _detail(text: str) -> str:
    """The useful part of an obstore message: HTTP status and the service's error code."""
    status = _STATUS_RE.search(text)
    code = _CODE_RE.search(text)
    if status:
        return f"HTTP {status[1]}" + (f" {code[1]}" if code else "")
    first = text.splitlines()[0] if text else "no detail"
    # obstore's first line repeats the whole request; keep it to one readable line.
    return first if len(first) <= 200 else first[:197] + "..."


# ---- opening ---------------------------------------------------------------------------------


def open_backend(spec: str | BackendSettings, env: Mapping[str, str] | None = None) -> Backend:
    """Build the backend a URL (plus [backend] settings) names; secrets are read here.

    `env` is the environment `*_env` keys are looked up in (default: this process's).
    """
    settings = BackendSettings(url=spec) if isinstance(spec, str) else spec
    environ: Mapping[str, str] = os.environ if env is None else env
    try:
        parsed = urlsplit(settings.url)
    except ValueError as e:  # an unbalanced [ or ]
        raise PermanentBackendError(
            f"{settings.url}: not a URL ({e}); use file:///path, azure://container/prefix, "
            "s3://bucket/prefix or gs://bucket/prefix", "config") from None
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return _open_file(settings.url, parsed.netloc, parsed.path)
    if scheme not in ("azure", "s3", "gs"):
        raise PermanentBackendError(
            f"{settings.url}: unsupported backend scheme {parsed.scheme!r}; use file:///path, "
            "azure://container/prefix, s3://bucket/prefix or gs://bucket/prefix", "config")
    name, prefix = parsed.netloc, unquote(parsed.path).strip("/")
    if not name:
        raise PermanentBackendError(f"{settings.url}: no container or bucket name", "config")
    client = _client_options(settings)
    put_client = _client_options(settings, uploads=True)
    retry: RetryConfig = {"max_retries": 0}
    make = {"azure": _azure, "s3": _s3, "gs": _gcs}[scheme]

    def rebuild() -> tuple[ObjectStore, ObjectStore]:
        """The stores (reads, uploads) with new connection pools (Backend.renew)."""
        return (make(settings, name, environ, client, retry)[0],
                make(settings, name, environ, put_client, retry)[0])

    where = f"container {name!r}" if scheme == "azure" else f"bucket {name!r}"
    try:
        store, creds = make(settings, name, environ, client, retry)
        put_store = make(settings, name, environ, put_client, retry)[0]
    except BackendError:
        raise
    except Exception as e:  # obstore refuses a malformed key, endpoint or region here
        raise PermanentBackendError(
            f"{settings.url}: cannot set up the backend: {_detail(str(e))}; check [backend]",
            "config") from None
    return Backend(store, settings.url, prefix, credentials=creds, where=where,
                   timeout_s=settings.timeout_s, min_rate_bps=settings.min_rate_bps,
                   put_store=put_store, rebuild=rebuild, port=_service_port(settings.endpoint))


def _service_port(endpoint: str | None) -> int | None:
    """The TCP port requests go to: the endpoint's, else HTTPS to the public service."""
    if not endpoint:
        return 443
    parts = urlsplit(endpoint)
    try:
        return parts.port or (80 if parts.scheme.lower() == "http" else 443)
    except ValueError:  # a malformed port: obstore has refused it already
        return None


def _open_file(url: str, netloc: str, path: str) -> Backend:
    if netloc not in ("", "localhost"):
        raise PermanentBackendError(f"{url}: file URLs take an absolute path: file:///path",
                                    "config")
    root = Path(unquote(path))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermanentBackendError(f"{url}: cannot create {root}: {e.strerror}",
                                    "config") from None
    return Backend(LocalStore(root, mkdir=True), url, where=f"folder {root}",
                   credentials="file permissions")


def _client_options(s: BackendSettings, uploads: bool = False) -> ClientConfig:
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


def read_secret(ref: SecretRef, env: Mapping[str, str], what: str) -> str:
    """The secret's value, from its file (private, like a key file) or environment variable."""
    if ref.source == "env":
        value = env.get(ref.where)
        if not value:
            raise PermanentBackendError(
                f"{what}: environment variable {ref.where} is not set (or empty); set it in the "
                "service's environment (systemd: EnvironmentFile=)", "config")
        return value.strip()
    path = Path(ref.where)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermanentBackendError(
                f"{what}: {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}", "config")
        value = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise PermanentBackendError(f"{what}: cannot read {path}: {e.strerror}",
                                    "config") from None
    if not value:
        raise PermanentBackendError(f"{what}: {path} is empty", "config")
    return value


def parse_connection_string(text: str) -> dict[str, str]:
    """Azure `Key=Value;...` connection strings (values may contain '=')."""
    out: dict[str, str] = {}
    for part in text.strip().split(";"):
        if part.strip():
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"connection string part {name.strip()!r} has no '='")
            out[name.strip()] = value.strip()
    return out


def _azure(s: BackendSettings, container: str, env: Mapping[str, str], client: ClientConfig,
           retry: RetryConfig) -> tuple[ObjectStore, str]:
    kw: dict[str, Any] = {}
    account, endpoint = s.account, s.endpoint
    if s.connection_string is not None:
        creds = f"connection string from {s.connection_string.describe()}"
        try:
            parts = parse_connection_string(
                read_secret(s.connection_string, env, "backend connection string"))
        except ValueError as e:
            raise PermanentBackendError(f"{s.url}: {creds}: {e}", "config") from None
        if parts.get("UseDevelopmentStorage", "").lower() == "true":
            parts = {"AccountName": AZURITE_ACCOUNT, "AccountKey": AZURITE_KEY,
                     "BlobEndpoint": f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}"}
        account = account or parts.get("AccountName")
        if "AccountKey" in parts:
            kw["account_key"] = parts["AccountKey"]
        if "SharedAccessSignature" in parts:
            kw["sas_key"] = parts["SharedAccessSignature"].lstrip("?")
        if endpoint is None and "BlobEndpoint" in parts:
            endpoint = parts["BlobEndpoint"].rstrip("/")
        elif endpoint is None and "EndpointSuffix" in parts and account:
            proto = parts.get("DefaultEndpointsProtocol", "https")
            endpoint = f"{proto}://{account}.blob.{parts['EndpointSuffix']}"
        if endpoint and endpoint.startswith("http://"):
            client = {**client, "allow_http": True}  # the connection string asked for it
    elif s.account_key is not None:
        creds = f"account key from {s.account_key.describe()}"
        kw["account_key"] = read_secret(s.account_key, env, "backend account key")
    elif s.sas_token is not None:
        creds = f"SAS token from {s.sas_token.describe()}"
        kw["sas_key"] = read_secret(s.sas_token, env, "backend SAS token").lstrip("?")
    else:
        creds = "Azure default credentials (AZURE_* environment, managed identity)"
    if not account:
        raise PermanentBackendError(
            f"{s.url}: no storage account name; set [backend] account", "config")
    if endpoint is not None:
        # Not use_emulator=True: obstore then ignores `endpoint` and dials port 10000.
        kw["endpoint"] = endpoint
    store = AzureStore(container, account_name=account, client_options=client,
                       retry_config=retry, **kw)
    return store, creds


def _s3(s: BackendSettings, bucket: str, env: Mapping[str, str], client: ClientConfig,
        retry: RetryConfig) -> tuple[ObjectStore, str]:
    kw: dict[str, Any] = {
        # The service checks this SHA-256 of the body and refuses the PUT on a mismatch.
        "checksum_algorithm": "sha256",
    }
    provider = None
    if s.region:
        kw["region"] = s.region
    if s.endpoint:
        kw["endpoint"] = s.endpoint
        kw["virtual_hosted_style_request"] = False  # path-style: MinIO, Ceph, emulators
    if s.secret_access_key is not None:
        if s.access_key_id_env is not None:
            key_id = env.get(s.access_key_id_env, "")
            if not key_id:
                raise PermanentBackendError(
                    f"{s.url}: environment variable {s.access_key_id_env} (access key id) is "
                    "not set", "config")
        else:
            key_id = s.access_key_id or ""
        kw["access_key_id"] = key_id
        kw["secret_access_key"] = read_secret(s.secret_access_key, env,
                                              "backend secret access key")
        creds = f"access key {key_id[:4]}… with secret from {s.secret_access_key.describe()}"
        if s.session_token is not None:
            kw["token"] = read_secret(s.session_token, env, "backend session token")
            creds += f" and session token from {s.session_token.describe()}"
    elif s.profile is not None:
        try:
            import boto3
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError:
            raise PermanentBackendError(
                f"{s.url}: profile = {s.profile!r} needs boto3: pip install boto3",
                "config") from None
        provider = Boto3CredentialProvider(boto3.Session(profile_name=s.profile))
        creds = f"AWS profile {s.profile!r}"
    else:
        creds = ("AWS default credential chain (AWS_* environment, web identity, container, "
                 "instance metadata)")
    store = S3Store(bucket, client_options=client, retry_config=retry,
                    credential_provider=provider, **kw)
    return store, creds


def _gcs(s: BackendSettings, bucket: str, env: Mapping[str, str], client: ClientConfig,
         retry: RetryConfig) -> tuple[ObjectStore, str]:
    kw: dict[str, Any] = {}
    if s.endpoint:
        kw["base_url"] = s.endpoint
    if s.service_account_key is not None:
        kw["service_account_key"] = read_secret(s.service_account_key, env,
                                                "backend service account key")
        creds = f"service account key from {s.service_account_key.describe()}"
    else:
        creds = "Google application default credentials"
    store = GCSStore(bucket, client_options=client, retry_config=retry, **kw)
    return store, creds
