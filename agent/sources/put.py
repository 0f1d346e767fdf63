"""`skyferry put`: a local unix socket the daemon serves, and its client."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

from agent.errors import SkyferryError, SourceError
from agent.pipeline import IngestRequest
from agent.sources import Ingest
from agent.telemetry.logs import log_event

log = logging.getLogger("skyferry.put")
PUT_SOURCE = "put"
_MAX_LINE = 1 << 16


class PutServer:
    """Accepts `put` requests; answers only after the object is durable in the store."""

    def __init__(self, socket_path: Path, ingest: Ingest, classes: list[str]) -> None:
        self.socket_path = socket_path
        self.ingest = ingest
        self.classes = classes

    async def run(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._handle, path=self.socket_path,
                                                 limit=_MAX_LINE)
        self.socket_path.chmod(0o660)
        async with server:
            await server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            reply = await self._answer(line)
        except Exception as e:  # a bad client must never take the daemon down
            reply = {"ok": False, "error": f"internal error: {e}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        try:
            await writer.drain()
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            path, name, priority = Path(req["path"]), str(req["name"]), str(req["priority"])
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed request"}
        if priority not in self.classes:
            return {"ok": False, "error": f"unknown class {priority!r}; "
                    f"use one of: {', '.join(self.classes)}"}
        try:
            result = await self.ingest(IngestRequest(path, PUT_SOURCE, name, priority))
        except SkyferryError as e:
            return {"ok": False, "error": str(e)}
        log_event(log, logging.INFO, "put_accepted", f"put {name} accepted", file=name,
                  object=result.object_id, bytes=result.size)
        return {"ok": True, "object": result.object_id, "size": result.size,
                "duplicate": result.duplicate_of is not None}


def request_put(socket_path: Path, path: Path, name: str, priority: str,
                timeout_s: float = 3600.0) -> dict[str, Any] | None:
    """Ask a running daemon to ingest `path`; None when no daemon listens on the socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    with s:
        s.settimeout(timeout_s)
        msg = {"op": "put", "path": str(path), "name": name, "priority": priority}
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            part = s.recv(65536)
            if not part:
                break
            buf += part
    try:
        reply: dict[str, Any] = json.loads(buf)
    except ValueError:
        raise SourceError(f"the daemon at {socket_path} gave no answer; see its log") from None
    return reply
