"""The client side of the daemon's socket (sources/put.py), for `skyferry put` and `status`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import SourceError

BUSY_RETRIES = 20  # the daemon answered "busy": try again this many times
BUSY_WAIT_S = 0.25
STATUS_TIMEOUT_S = 10.0
PUT_SOURCE = "put"  # the source name of what `skyferry put` queues
PUT_TIMEOUT_S = 3600.0  # the answer comes once the file is durable: a large file takes a while
# A descriptor per file: SCM_RIGHTS carries at most 253 in one message, so a request of many
# files is sent in pieces of FDS_PER_MESSAGE, each with its part of the request line.
FDS_PER_MESSAGE = 250


def open_for_put(path: Path) -> int:
    """Open `path` with the caller's own rights; the daemon reads only this descriptor."""
    try:
        # O_NONBLOCK: a FIFO must not hang the client; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise SourceError(f"{path}: cannot be read: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def reader_of(fd: int) -> Callable[[], int]:
    """An opener for IngestRequest: a descriptor of its own on `fd`'s file, at the start
    (whoever sent `fd` may have moved the shared offset)."""
    def opener() -> int:
        own = os.dup(fd)
        try:
            os.lseek(own, 0, os.SEEK_SET)
        except BaseException:
            os.close(own)
            raise
        return own
    return opener


def request_put(socket_path: Path, fd: int, path: Path, name: str, priority: str,
                timeout_s: float = PUT_TIMEOUT_S) -> dict[str, Any] | None:
    """Ask a running daemon to queue the open file `fd` (`path` only names it in messages);
    None when no daemon listens on the socket."""
    msg = {"op": "put", "path": str(path), "name": name, "priority": priority}
    return _exchange(socket_path, msg, [fd], timeout_s)


def request_put_files(socket_path: Path, fds: list[int], files: list[tuple[str, str]],
                      priority: str, timeout_s: float = PUT_TIMEOUT_S
                      ) -> dict[str, Any] | None:
    """Ask a running daemon to queue many open files at once (`files`: (path, name) of each
    descriptor, in order); small ones are sealed together. None when no daemon listens."""
    msg = {"op": "put", "priority": priority,
           "files": [{"path": p, "name": n} for p, n in files]}
    return _exchange(socket_path, msg, fds, timeout_s)


def request_status(socket_path: Path,
                   timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any] | None:
    """The running daemon's live state; None when no daemon listens on the socket."""
    return _exchange(socket_path, {"op": "status"}, [], timeout_s)


def _exchange(socket_path: Path, msg: dict[str, Any], fds: list[int],
              timeout_s: float) -> dict[str, Any] | None:
    for _ in range(BUSY_RETRIES):
        reply = _once(socket_path, msg, fds, timeout_s)
        if reply is None or not reply.get("busy"):
            return reply
        time.sleep(BUSY_WAIT_S)
    return reply


def _once(socket_path: Path, msg: dict[str, Any], fds: list[int],
          timeout_s: float) -> dict[str, Any] | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout_s)
        try:
            _connect(s, socket_path, timeout_s)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as e:
            raise SourceError(f"cannot talk to the daemon at {socket_path}: {e.strerror}; "
                              "the socket is for its owner and group only") from None
        data = json.dumps(msg).encode() + b"\n"
        # Refused before the request was read: its answer says why.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            _send(s, data, fds)
        buf = _read_line(s, socket_path)
    try:
        reply: dict[str, Any] = json.loads(buf)
    except ValueError:
        raise SourceError(f"the daemon at {socket_path} gave no answer; see its log") from None
    return reply


def _send(s: socket.socket, data: bytes, fds: list[int]) -> None:
    """The request line, its descriptors FDS_PER_MESSAGE at a time, each group with a piece of
    the line (at least one byte each; the line is longer than the number of groups)."""
    groups = [fds[i:i + FDS_PER_MESSAGE] for i in range(0, len(fds), FDS_PER_MESSAGE)] or [[]]
    at = 0
    for i, group in enumerate(groups):
        piece = data[at:] if i == len(groups) - 1 else data[at:at + 1]
        sent = socket.send_fds(s, [piece], group) if group else s.send(piece)
        at += sent
    s.sendall(data[at:])


def _connect(s: socket.socket, socket_path: Path, timeout_s: float) -> None:
    # A unix socket whose backlog is full refuses a non-blocking connect (EAGAIN) instead of
    # waiting: try again until the timeout.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            s.connect(str(socket_path))
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise SourceError(f"the daemon at {socket_path} accepts no connection; it is "
                                  "busy or stuck, see its log") from None
            time.sleep(BUSY_WAIT_S / 5)


def _read_line(s: socket.socket, socket_path: Path) -> bytes:
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            part = s.recv(1 << 16)
            if not part:
                break
            buf += part
    except TimeoutError:
        raise SourceError(f"the daemon at {socket_path} did not answer in time; see its "
                          "log") from None
    except ConnectionResetError:
        pass
    return buf
