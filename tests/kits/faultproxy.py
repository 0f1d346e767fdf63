"""A small TCP proxy that breaks the link between the agent and an object-store emulator.

It runs its own asyncio loop in a background thread, so synchronous tests (which drive a real
daemon subprocess) can change the link while a transfer is under way:

- `delay_s`: one-way latency added in each direction (RTT grows by twice this);
- `rate_bps`: a cap in bytes per second on each direction, shared by all connections;
- `cut_every_at(n)`: cut each connection once it has carried n bytes upstream;
  `cut_at_totals([...])`: cut every open connection when the total upstream count crosses each
  offset; `cut_all()`: cut every open connection now; `cut_after_s`: cut each connection this
  long after it opened;
- `stall_for(s)`: black hole for `s` seconds: accept and read, forward nothing; connections
  stalled are never resumed (their byte stream has a hole), the client must time them out;
- `errors_for(s, status, retry_after)`: answer every request with an HTTP error for a while.

Byte counters (`bytes_up`: client to server, `bytes_down`) are what tests measure "bytes sent
on the link" with. All knobs are plain attributes read by the loop thread; ints and floats are
assigned atomically, which is all the synchronisation they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

READ_SIZE = 64 << 10
REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


class _Bucket:
    """Token bucket on the proxy's loop: the link's rate in one direction."""

    def __init__(self) -> None:
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int, rate: float | None) -> None:
        if not rate:
            self._tokens, self._stamp = 0.0, time.monotonic()
            return
        async with self._lock:
            now = time.monotonic()
            # A burst of ~10 ms keeps the cap tight without a sleep per small write.
            self._tokens = min(rate * 0.01, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / rate)


@dataclass(eq=False)  # identity: connections live in a set
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    up: int = 0
    opened: float = field(default_factory=time.monotonic)
    stalled: bool = False
    closed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def cut(self) -> None:
        """Abort both sides with a reset, the way a dropped link looks to the client."""
        if self.closed:
            return
        self.closed = True
        for w in (self.client, self.server):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.transport.abort()
        for t in self.tasks:
            t.cancel()


class FaultProxy:
    """Forward 127.0.0.1:<port> to target_host:target_port, with faults on demand."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.port = 0
        # Knobs.
        self.delay_s = 0.0
        self.rate_bps: float | None = None
        self.down_rate_bps: float | None = None
        self.cut_each_at: int | None = None
        self.cut_after_s: float | None = None
        self._cut_totals: list[int] = []
        self._stall_until = 0.0
        self._error_until = 0.0
        self._error_status = 503
        self._retry_after: int | None = None
        # Counters.
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.cuts = 0  # connections cut by a fault
        self.cut_events = 0  # cut_all / cut_at_totals occurrences
        self.error_responses = 0
        self.errors_by_status: dict[int, int] = {}
        self.stalled_connections = 0
        # When the first and the latest upstream bytes arrived (monotonic), and when upstream
        # bytes left the proxy's link for the server (after delay and rate cap).
        self.first_up_at: float | None = None
        self.last_up_at: float | None = None
        self.delivered_up = 0
        self.first_delivered_at: float | None = None
        self.last_delivered_at: float | None = None
        self._conns: set[_Conn] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._up_bucket: _Bucket | None = None
        self._down_bucket: _Bucket | None = None

    # ---- life cycle ----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._up_bucket, self._down_bucket = _Bucket(), _Bucket()
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for c in list(self._conns):
                c.cut()
            # Finish every task here, so none is left to be torn down by the garbage
            # collector after the loop has closed.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """http://host:port of the proxy, to put where the emulator's endpoint would go."""
        return f"http://{self.listen[0]}:{self.port}"

    # ---- faults --------------------------------------------------------------------------

    def _call(self, fn: object) -> None:
        self._loop.call_soon_threadsafe(fn)  # type: ignore[arg-type]

    def cut_all(self) -> None:
        """Cut every open connection now (new ones still work)."""
        self._call(self._cut_open)

    def _cut_open(self) -> None:
        self.cut_events += 1
        for c in list(self._conns):
            if not c.closed:
                self.cuts += 1
                c.cut()

    def cut_at_totals(self, offsets: Iterable[int]) -> None:
        """Cut every open connection when bytes_up first reaches each offset."""
        self._cut_totals = sorted(offsets)

    @property
    def pending_cuts(self) -> int:
        return len(self._cut_totals)

    def stall_for(self, seconds: float) -> None:
        self._stall_until = time.monotonic() + seconds

    @property
    def stalling(self) -> bool:
        return time.monotonic() < self._stall_until

    def errors_for(self, seconds: float, status: int = 503, retry_after: int | None = 1) -> None:
        """Answer every request with `status` (and Retry-After) for `seconds`."""
        self._error_status, self._retry_after = status, retry_after
        self._error_until = time.monotonic() + seconds
        # Requests already on the wire would slip through on kept-alive connections.
        self.cut_all()

    @property
    def erroring(self) -> bool:
        return time.monotonic() < self._error_until

    def reset_counters(self) -> None:
        self.bytes_up = self.bytes_down = self.connections = self.cuts = 0
        self.cut_events = self.error_responses = self.stalled_connections = 0
        self.errors_by_status = {}
        self.first_up_at = self.last_up_at = None
        self.delivered_up = 0
        self.first_delivered_at = self.last_delivered_at = None

    def _count_up(self, conn: _Conn, n: int) -> None:
        conn.up += n
        self.bytes_up += n
        if n:
            self.last_up_at = time.monotonic()
            if self.first_up_at is None:
                self.first_up_at = self.last_up_at

    # ---- forwarding ----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio's server asks this task for its exception when it ends: end it normally even
        # when stop() cancels it, or the cancellation is logged as an error.
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            if self.erroring:
                await self._answer_error(reader, writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                conn.cut()
                return
            conn.server = up_writer
            conn.tasks = [
                asyncio.create_task(self._pipe(conn, reader, up_writer, upstream=True)),
                asyncio.create_task(self._pipe(conn, up_reader, writer, upstream=False)),
            ]
            if self.cut_after_s is not None:
                conn.tasks.append(asyncio.create_task(self._cut_later(conn, self.cut_after_s)))
            await asyncio.gather(*conn.tasks[:2], return_exceptions=True)
        finally:
            self._conns.discard(conn)
            if not conn.closed:
                conn.closed = True
                for w in (conn.client, conn.server):
                    if w is not None:
                        with contextlib.suppress(Exception):
                            w.close()
            for t in conn.tasks:
                t.cancel()

    async def _cut_later(self, conn: _Conn, after: float) -> None:
        await asyncio.sleep(after)
        if not conn.closed:
            self.cuts += 1
            conn.cut()

    async def _pipe(self, conn: _Conn, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, upstream: bool) -> None:
        """Copy one direction: count, stall, cut, delay and rate-limit on the way."""
        bucket = self._up_bucket if upstream else self._down_bucket
        assert bucket is not None
        # Delayed data waits here; the queue bound stands in for the link's buffer so that TCP
        # back-pressure reaches the client as it would on a real slow link.
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=4)
        sender = asyncio.create_task(self._deliver(conn, queue, writer, bucket, upstream))
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                if self.stalling or conn.stalled:
                    if not conn.stalled:
                        conn.stalled = True
                        self.stalled_connections += 1
                    continue  # black hole: read and drop, the client sees silence
                if upstream:
                    data = self._apply_cuts(conn, data)
                    if data is None:
                        return
                else:
                    self.bytes_down += len(data)
                await queue.put((time.monotonic() + self.delay_s, data))
            await queue.put(None)
            await sender
        except (ConnectionError, OSError):
            conn.cut()
        finally:
            if not sender.done():
                if conn.closed:
                    sender.cancel()
                else:
                    with contextlib.suppress(Exception):
                        await sender

    def _apply_cuts(self, conn: _Conn, data: bytes) -> bytes | None:
        """Count upstream bytes; trim and cut where a per-connection or total offset falls."""
        limit = len(data)
        if self.cut_each_at is not None:
            limit = min(limit, max(0, self.cut_each_at - conn.up))
        total_cut = False
        if self._cut_totals and self.bytes_up + limit >= self._cut_totals[0]:
            limit = min(limit, max(0, self._cut_totals[0] - self.bytes_up))
            total_cut = True
        if limit == len(data) and not total_cut:
            self._count_up(conn, len(data))
            return data
        # The bytes before the cut point did go out on the link; count them, drop the rest.
        self._count_up(conn, limit)
        if total_cut:
            while self._cut_totals and self._cut_totals[0] <= self.bytes_up:
                self._cut_totals.pop(0)
            self._cut_open()
        else:
            self.cuts += 1
            conn.cut()
        return None

    async def _deliver(self, conn: _Conn, queue: asyncio.Queue[tuple[float, bytes] | None],
                       writer: asyncio.StreamWriter, bucket: _Bucket, upstream: bool) -> None:
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await bucket.take(len(data), self.rate_bps if upstream else self.down_rate_bps)
                if conn.closed:
                    return
                writer.write(data)
                if upstream:
                    self.delivered_up += len(data)
                    self.last_delivered_at = time.monotonic()
                    if self.first_delivered_at is None:
                        self.first_delivered_at = self.last_delivered_at
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            conn.cut()

    async def _answer_error(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """Read one request (head and body) and answer it with the configured error."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            self.bytes_up += len(head)
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
            while length > 0:
                data = await reader.read(min(length, READ_SIZE))
                if not data:
                    break
                length -= len(data)
                self.bytes_up += len(data)
            status = self._error_status
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>'
                    + (b"SlowDown" if status == 503 else b"TooManyRequests")
                    + b"</Code><Message>fault proxy: try again later</Message></Error>")
            lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
                     "Content-Type: application/xml", f"Content-Length: {len(body)}",
                     "Connection: close"]
            if self._retry_after is not None:
                lines.append(f"Retry-After: {self._retry_after}")
            self.error_responses += 1
            self.errors_by_status[status] = self.errors_by_status.get(status, 0) + 1
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, OSError, ValueError):
            pass
