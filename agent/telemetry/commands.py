"""Operator commands (pause, resume, flush, priority) arriving over MQTT.

A command is a JSON object (`{"cmd": "priority", "object": "<id>", "class": "critical"}`) or
the same words as plain text (`priority <id> critical`). Each one is applied at once (well
inside the 1 s the issue asks for), logged, counted, and answered with a `command` event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agent.errors import SkyferryError
from agent.gate import Gate
from agent.store import Store
from agent.telemetry.logs import log_event
from agent.telemetry.metrics import Metrics

log = logging.getLogger("skyferry.commands")
COMMANDS = ("pause", "resume", "flush", "priority")
RunBlocking = Callable[..., Awaitable[Any]]


def parse_command(raw: bytes) -> dict[str, Any]:
    """A command as a dict with at least "cmd"; raises ValueError when it cannot be read."""
    text = raw.decode("utf-8", "strict").strip()
    if text.startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("cmd"), str):
            raise ValueError('a JSON command needs a "cmd" string')
        return data
    words = text.split()
    if not words:
        raise ValueError("empty command")
    out: dict[str, Any] = {"cmd": words[0]}
    if words[0] == "priority" and len(words) == 3:
        out["object"], out["class"] = words[1], words[2]
    return out


class Commands:
    """Applies commands to the gate and the store; `enabled=False` ignores (and logs) them."""

    def __init__(self, gate: Gate, store: Store, wake_uplink: Callable[[], None],
                 run_blocking: RunBlocking, metrics: Metrics, enabled: bool) -> None:
        self.gate = gate
        self.store = store
        self.wake_uplink = wake_uplink
        self.run_blocking = run_blocking
        self.metrics = metrics
        self.enabled = enabled

    async def apply(self, raw: bytes) -> dict[str, Any]:
        """Apply one command; returns the answer that is published as a `command` event."""
        try:
            cmd = parse_command(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return self._answer("?", False, f"unreadable command: {e}; send e.g. "
                                '{"cmd": "pause"}', logging.WARNING)
        name = cmd["cmd"]
        if not self.enabled:
            return self._answer(name, False, "commands are disabled on this site "
                                "([mqtt.status] commands = false); ignored", logging.WARNING,
                                result="ignored")
        if name == "pause":
            self.gate.set_paused(True)
            return self._answer(name, True, "uploads paused until `resume` or `flush`")
        if name == "resume":
            self.gate.set_paused(False)
            self.wake_uplink()
            return self._answer(name, True, "uploads resume inside windows")
        if name == "flush":
            opened = self.gate.flush()
            self.wake_uplink()
            return self._answer(name, True, "gate open until the queue is empty" if opened else
                                "link is down: the gate opens as soon as it answers")
        if name == "priority":
            return await self._priority(cmd)
        return self._answer(name, False, f"unknown command; use one of {', '.join(COMMANDS)}",
                            logging.WARNING)

    async def _priority(self, cmd: dict[str, Any]) -> dict[str, Any]:
        obj, cls = cmd.get("object"), cmd.get("class")
        if not isinstance(obj, str) or not isinstance(cls, str):
            return self._answer("priority", False, 'needs "object" and "class", e.g. '
                                '{"cmd": "priority", "object": "<id>", "class": "critical"}',
                                logging.WARNING)
        try:
            moved = await self.run_blocking(self.store.set_priority, obj, cls)
        except SkyferryError as e:
            return self._answer("priority", False, str(e), logging.WARNING)
        if not moved:
            return self._answer("priority", False, f"object {obj} is not queued (unknown, or "
                                "already delivered)", logging.WARNING)
        self.wake_uplink()
        return self._answer("priority", True, f"object {obj} is now in class {cls}",
                            fields={"object": obj, "class": cls})

    def _answer(self, name: str, ok: bool, detail: str, level: int = logging.INFO,
                result: str | None = None, fields: dict[str, str] | None = None
                ) -> dict[str, Any]:
        fields = fields or {}
        result = result or ("applied" if ok else "rejected")
        self.metrics.commands.labels(name if name in COMMANDS else "other", result).inc()
        log_event(log, level, f"command_{result}", f"command {name}: {detail}", command=name,
                  **fields)
        return {"event": "command", "cmd": name, "ok": ok, "result": result, "detail": detail,
                **fields}
