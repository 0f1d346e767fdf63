"""The daemon's local socket: `skyferry put` and `skyferry status` (the client is put_client.py).

One JSON line per request, one JSON line per answer. A `put` request carries the file as an
open descriptor (SCM_RIGHTS), never as a path the daemon would open: the client opens the file
with its own rights, so a member of the socket's group can queue only files they can read
themselves. The `path` a client sends is used in messages only. A request may name many files
(`files`, one descriptor each, in order): its small files are sealed together as one pack, its
large ones one by one, and it is answered once all are durable, file by file.

Outsiders can connect at will, so a connection costs a small task, never a thread: a request
not complete within REQUEST_TIMEOUT_S is closed, and beyond MAX_CONNECTIONS at once a new
connection is answered "busy" and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import SkyferryError
from agent.ingest.requests import IngestRequest
from agent.obs.logs import Throttled, log_event
from agent.sources import Ingest, IngestPack
from agent.sources.put_client import FDS_PER_MESSAGE, PUT_SOURCE, reader_of
from agent.sources.put_walk import open_file_limit

log = logging.getLogger("skyferry.put")
MAX_LINE = 1 << 20  # a request naming PUT_MAX_FILES files with long paths
PUT_MAX_FILES = 1000  # descriptors one request may carry (`skyferry put` sends at most these)
MAX_FDS = PUT_MAX_FILES  # more are received (and closed) so they are noticed
REQUEST_TIMEOUT_S = 5.0  # an idle or half-sent request is closed after this
REPLY_TIMEOUT_S = 10.0  # a client that does not read its answer is dropped after this
MAX_CONNECTIONS = 32
ACCEPT_RETRY_S = 0.1  # out of descriptors: accept again after this

StatusFn = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection (SO_PEERCRED: set by the kernel at connect)."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, conn: socket.socket) -> Peer:
        fmt = "3i"
        pid, uid, gid = struct.unpack(
            fmt, conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt)))
        return cls(pid, uid, gid)


class Refused(Exception):
    """A request answered with an error: the message says what was wrong and what to do."""


class PutServer:
    """Accepts `put` and `status` requests; a put is answered once the object is durable."""

    def __init__(self, socket_path: Path, ingest: Ingest, classes: list[str],
                 status: StatusFn | None = None, *, max_connections: int = MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S,
                 ingest_pack: IngestPack | None = None, pack_below: int = 0) -> None:
        """`ingest_pack`, `pack_below`: files of a request of many below `pack_below` bytes
        are sealed together; without them, each alone."""
        self.socket_path = socket_path
        self.ingest = ingest
        self.ingest_pack = ingest_pack
        self.pack_below = pack_below
        self.classes = classes
        self.status = status
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.connections = 0  # open now
        self._busy = Throttled()
        self._timeouts = Throttled()
        self._accept_errors = Throttled()
        self._refusals = Throttled(every_s=10.0, burst=20)  # a group member may loop

    def _listen(self) -> socket.socket:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.socket_path))
            self.socket_path.chmod(0o660)  # before listen(): nobody else connects meanwhile
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        open_file_limit()  # a request may carry up to PUT_MAX_FILES descriptors
        sock = self._listen()
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    conn = await self._accept(loop, sock)
                    if conn is None:
                        continue
                    if self.connections >= self.max_connections:
                        self._refuse_busy(conn)
                        continue
                    self.connections += 1
                    tg.create_task(self._serve(loop, conn))
        finally:
            sock.close()

    async def _accept(self, loop: asyncio.AbstractEventLoop,
                      sock: socket.socket) -> socket.socket | None:
        try:
            conn, _ = await loop.sock_accept(sock)
        except OSError as e:  # EMFILE and the like: the server stays, the client retries
            self._accept_errors.log(log, logging.WARNING, "put_accept_failed",
                                    f"put socket: cannot accept a connection: {e.strerror}")
            await asyncio.sleep(ACCEPT_RETRY_S)
            return None
        conn.setblocking(False)
        return conn

    def _refuse_busy(self, conn: socket.socket) -> None:
        self._busy.log(log, logging.WARNING, "put_busy",
                       f"put socket: {self.connections} connections open, the most allowed; "
                       "a new one was refused", limit=self.max_connections)
        with contextlib.suppress(OSError):  # a fresh socket's buffer takes one short line
            conn.send(_line({"ok": False, "busy": True, "error": f"busy: {self.connections} "
                             "requests in progress; try again in a moment"}),
                      socket.MSG_DONTWAIT)
        conn.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            peer = Peer.of(conn)
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    line, fds = await read_request(loop, conn)
            except TimeoutError:
                self._timeouts.log(log, logging.WARNING, "put_timeout",
                                   f"put socket: no complete request within "
                                   f"{self.request_timeout_s:g}s; connection closed",
                                   peer_uid=peer.uid, peer_pid=peer.pid)
                reply = {"ok": False, "error": f"no complete request within "
                         f"{self.request_timeout_s:g}s"}
            except Refused as e:
                reply = self._refused(e, peer)
            else:  # no time limit here: a put is answered once its file is durable
                reply = await self._answer(line, fds, peer)
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                await loop.sock_sendall(conn, _line(reply))
        except (OSError, TimeoutError):
            pass  # the client went away; a put it asked for is durable all the same
        except Exception:  # one connection's failure must never end the server
            log.exception("put socket: a connection failed")
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()
            self.connections -= 1

    async def _answer(self, line: bytes, fds: list[int], peer: Peer) -> dict[str, Any]:
        try:
            try:
                req = json.loads(line)
            except (ValueError, RecursionError):  # nested past the decoder's limit
                raise Refused("malformed request: expected one line of JSON") from None
            if not isinstance(req, dict):
                raise Refused("malformed request: expected a JSON object on one line")
            op = req.get("op", "put")
            if op == "status":
                return await self._status()
            if op != "put":
                raise Refused(f"unknown request {op!r}; use put or status")
            if "files" in req:
                return await self._put_files(req, fds, peer)
            return await self._put(req, fds, peer)
        except (Refused, SkyferryError) as e:
            return self._refused(e, peer)
        except Exception as e:  # a bad client must never take the daemon down
            log.exception("put request failed")
            return {"ok": False, "error": f"internal error: {e}"}

    async def _status(self) -> dict[str, Any]:
        if self.status is None:
            raise Refused("this daemon does not answer status requests")
        return {"ok": True, "status": await self.status()}

    def _refused(self, e: Exception, peer: Peer) -> dict[str, Any]:
        self._refusals.log(log, logging.WARNING, "put_refused", f"put refused: {e}",
                           peer_uid=peer.uid, peer_pid=peer.pid)
        return {"ok": False, "error": str(e)}

    async def _put(self, req: dict[str, Any], fds: list[int], peer: Peer) -> dict[str, Any]:
        for key in ("name", "priority", "path"):
            if key not in req and key != "path":
                raise Refused(f"malformed request: no {key!r}")
            if not isinstance(req.get(key, ""), str):
                raise Refused(f"malformed request: {key!r} must be a string")
        name, priority = req["name"], req["priority"]
        shown = Path(req.get("path") or name)
        if priority not in self.classes:
            raise Refused(f"unknown class {priority!r}; use one of: {', '.join(self.classes)}")
        fd, seen = received_file(fds, shown)
        result = await self.ingest(IngestRequest(shown, PUT_SOURCE, name, priority,
                                                 opener=reader_of(fd), seen=seen))
        log_event(log, logging.INFO, "put_accepted", f"put {name} accepted", file=name,
                  object=result.object_id, bytes=result.size, peer_uid=peer.uid,
                  peer_pid=peer.pid, duplicate=result.duplicate_of is not None)
        return {"ok": True, "object": result.object_id, "size": result.size,
                "duplicate": result.duplicate_of is not None}

    async def _put_files(self, req: dict[str, Any], fds: list[int], peer: Peer
                         ) -> dict[str, Any]:
        """Many files: the small ones as one pack, the others each alone; answered file by
        file (a file that cannot be taken fails alone)."""
        priority = req.get("priority")
        files = req["files"]
        if not isinstance(priority, str) or not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("name"), str)
                and isinstance(f.get("path", ""), str) for f in files):
            raise Refused("malformed request: 'priority' must be a string and 'files' a list "
                          "of {\"name\": ..., \"path\": ...}")
        if priority not in self.classes:
            raise Refused(f"unknown class {priority!r}; use one of: {', '.join(self.classes)}")
        if len(files) != len(fds):
            raise Refused(f"{len(files)} files named but {len(fds)} descriptors came; send one "
                          "per file, in order")
        answers: dict[int, dict[str, Any]] = {}
        small: list[tuple[int, IngestRequest]] = []
        for i, (f, fd) in enumerate(zip(files, fds, strict=True)):
            shown = Path(f.get("path") or f["name"])
            try:
                _, seen = received_file([fd], shown)
            except Refused as e:
                answers[i] = {"name": f["name"], "error": str(e)}
                continue
            r = IngestRequest(shown, PUT_SOURCE, f["name"], priority, opener=reader_of(fd),
                              seen=seen)
            if self.ingest_pack is not None and seen.st_size < self.pack_below:
                small.append((i, r))
            else:
                answers[i] = await self._put_one(r, peer)
        if small:
            answers.update(await self._put_pack(small, peer))
        return {"ok": True, "files": [answers[i] for i in range(len(files))]}

    async def _put_one(self, r: IngestRequest, peer: Peer) -> dict[str, Any]:
        try:
            result = await self.ingest(r)
        except SkyferryError as e:
            self._refused(e, peer)
            return {"name": r.name, "error": str(e)}
        return {"name": r.name, "object": result.object_id, "size": result.size,
                "duplicate": result.duplicate_of is not None}

    async def _put_pack(self, small: list[tuple[int, IngestRequest]], peer: Peer
                        ) -> dict[int, dict[str, Any]]:
        assert self.ingest_pack is not None
        try:
            result = await self.ingest_pack([r for _, r in small])
        except SkyferryError as e:  # e.g. the quota: none of them was stored
            self._refused(e, peer)
            return {i: {"name": r.name, "error": str(e)} for i, r in small}
        log_event(log, logging.INFO, "put_accepted", f"put {len(result.accepted)} files "
                  "accepted", files=len(result.accepted), object=result.object_id,
                  bytes=result.size, peer_uid=peer.uid, peer_pid=peer.pid)
        out: dict[int, dict[str, Any]] = {}
        for i, r in small:
            done = result.accepted.get(r.name)
            if done is not None:
                out[i] = {"name": r.name, "object": done.object_id, "size": done.size,
                          "duplicate": done.duplicate_of is not None}
            else:
                why = result.failed.get(r.name)
                out[i] = {"name": r.name, "error": str(why) if why else
                          "not stored: another file of this request has the same name"}
        return out


def _line(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, default=str).encode() + b"\n"


def received_file(fds: list[int], shown: Path) -> tuple[int, os.stat_result]:
    """The one descriptor a put carries, checked: a regular file, open for reading."""
    if not fds:
        raise Refused(f"{shown}: no open file came with the request; the daemon never opens "
                      "a path a client names: use `skyferry put`, which opens the file itself")
    if len(fds) != 1:
        raise Refused(f"{shown}: {len(fds)} descriptors came with the request; send one")
    fd = fds[0]
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{shown}: not a regular file")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_PATH or flags & os.O_ACCMODE == os.O_WRONLY:
        raise Refused(f"{shown}: the descriptor is not open for reading")
    return fd, st


async def read_request(loop: asyncio.AbstractEventLoop,
                       conn: socket.socket) -> tuple[bytes, list[int]]:
    """One request line and the descriptors sent with it (the caller closes them)."""
    buf = bytearray()
    fds: list[int] = []
    try:
        while b"\n" not in buf:
            if len(buf) > MAX_LINE:
                raise Refused(f"request longer than {MAX_LINE} bytes")
            data, got, flags = await _recv_fds(loop, conn)
            fds += got
            # Counted over the whole request: each piece of it may carry some, and a client
            # sending one per byte would make the daemon hold thousands.
            if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
                raise Refused(f"too many descriptors came with the request; send one per file, "
                              f"at most {MAX_FDS}")
            if not data:
                break  # the client closed its side: what came is the request
            buf += data
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return bytes(buf.split(b"\n", 1)[0]), fds


async def _recv_fds(loop: asyncio.AbstractEventLoop,
                    conn: socket.socket) -> tuple[bytes, list[int], int]:
    # asyncio's streams cannot receive descriptors: wait for readability, then recvmsg.
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(conn, 1 << 16, FDS_PER_MESSAGE + 3,
                                                  socket.MSG_CMSG_CLOEXEC)
            return data, fds, flags
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(conn.fileno(), _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(conn.fileno())


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
