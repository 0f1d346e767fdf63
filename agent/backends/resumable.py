"""Resumable uploads: what a service's own SDK adds to the obstore adapter (objstore.py).

obstore sends an object in one request, or as a multipart upload it cannot resume: a cut costs
the whole object. A service whose API keeps parts of an unfinished upload (Azure blocks, S3
multipart) gets an adapter here (azure_blocks.py, s3_multipart.py) that sends an object above
its `threshold` in parts and, on every attempt, first asks the service which parts it already
holds: after a cut, a daemon restart or a retry, only the missing ones cross the link. The
state to resume from lives at the service (block ids derived from the part's place, an S3
upload found by its key), so nothing has to be kept on the edge. The object appears only when
its parts are committed, create-only.

The SDKs run their own HTTP sessions, bound to the event loop that made them: `PerLoop` keeps
one per running loop (the daemon has one; tests and commands may run several in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from agent.backends.failures import Failures
from agent.backends.protocol import PutResult
from agent.errors import BackendError, TransientBackendError
from agent.obs.logs import log_event

T = TypeVar("T")
log = logging.getLogger("skyferry.backend")

# Runs one request under the backend's deadline for `nbytes` (ObstoreBackend._bounded).
Bounded = Callable[[Any, int], Awaitable[Any]]


class ResumableUploads(Protocol):
    threshold: int  # objects larger than this go in parts
    part_size: int

    async def put_new(self, full: str, key: str, data: bytes,
                      bounded: Bounded) -> PutResult | None:
        """Create-only upload of `data` under the full key `full`, in parts, sending only the
        parts the service does not hold yet. None: the object exists already (the caller
        checks it is the same). Failures are agent.errors' `BackendError`s."""

    def renew(self) -> None:
        """Drop the SDK's pooled connections: later requests open new ones."""


class PerLoop(Generic[T]):
    """One SDK client per running event loop, made on first use, closed with its loop.

    A keeper task per client closes it when cancelled: after `renew`, or by `asyncio.run`
    cancelling what is left as it ends, while the loop can still run the close.
    """

    def __init__(self, make: Callable[[], Awaitable[T]],
                 close: Callable[[T], Awaitable[object]], grace_s: float = 600.0) -> None:
        self._make = make
        self._close = close
        self.grace_s = grace_s  # how long requests under way may still need a renewed client
        self._clients: dict[asyncio.AbstractEventLoop, tuple[T, asyncio.Task[None]]] = {}

    async def get(self) -> T:
        loop = asyncio.get_running_loop()
        for other in [lp for lp in self._clients if lp.is_closed()]:
            del self._clients[other]  # its loop is gone, and its sockets with it
        held = self._clients.get(loop)
        if held is None:
            client = await self._make()
            keeper = loop.create_task(self._keep(client), name="sdk-client-keeper")
            held = self._clients[loop] = (client, keeper)
        return held[0]

    def renew(self) -> None:
        """The next request makes a new client (new connections). Requests under way keep
        theirs (an upload held through an outage resumes on it): the old client is closed
        once the longest of them would have ended (`grace_s`, the backend's deadline)."""
        clients, self._clients = self._clients, {}
        for _, keeper in clients.values():
            loop = keeper.get_loop()
            if not loop.is_closed():
                loop.call_later(self.grace_s, keeper.cancel)

    async def _keep(self, client: T) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await self._close(client)


def no_hidden_retry(session: Any) -> Any:
    """An aiohttp session that does not send a request a second time by itself.

    aiohttp re-sends an idempotent request (PUT) once, at once, when a reused connection
    drops under it (`ClientSession._retry_connection`, private, no public switch in 3.x):
    a retry out of sight of the uplink's policy and its counts, sending a whole part again.
    Both SDK adapters (azure_blocks.py, s3_multipart.py) build their sessions through this;
    tests/system/test_resume.py counts the bytes a cut costs, which would show it back.
    """
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


class _Answered(Exception):
    """An SDK's HTTP error, in the form `Failures` reads ("status code: N", <Code>)."""


def sdk_failure(failures: Failures, op: str, key: str, e: BaseException,
                status: int | None, code: str | None) -> BackendError:
    """Map an SDK's exception: an HTTP answer by its status and code, anything else (a reset,
    a refused connection, a timeout inside the SDK) as a transient failure of the link."""
    if isinstance(e, BackendError):
        return e
    if isinstance(e, TimeoutError):
        return failures.map(op, key, e)
    if status is not None:
        text = f"status code: {status}" + (f" <Code>{code}</Code>" if code else "")
        return failures.map(op, key, _Answered(text))
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return TransientBackendError(f"{failures.url}: {op} {key} failed: {first or type(e).__name__}",
                                 "connection")


def log_resumed(service: str, key: str, held: int, sent: int, total: int) -> None:
    """One line when an upload picked up parts an earlier attempt left at the service."""
    if held:
        log_event(log, logging.INFO, "upload_resumed",
                  f"{service}: {held} of {total} parts were already at the service; sent "
                  f"{sent}", key=key, held=held, sent=sent, parts=total)
