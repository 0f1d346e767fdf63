"""Operator commands (pause, resume, flush, priority) arriving over MQTT.

A command is a JSON object (`{"cmd": "priority", "object": "<id>", "class": "critical"}`),
signed by an operator key the site trusts (agent/telemetry/command_auth.py; `skyferry command`
signs and publishes). Each one is checked, applied at once (well inside the 1 s the issue asks
for), logged, counted, and answered with a `command` event; a refused one is logged as
`command_refused` with its reason and counted in skyferry_commands_refused_total.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.errors import SkyferryError
from agent.host.blocking import RunBlocking
from agent.obs.logs import Throttled, log_event
from agent.obs.metrics import Metrics
from agent.store.store import Store
from agent.telemetry.command_auth import CommandRefused, CommandVerifier, name_of
from agent.uplink.gate import Gate

log = logging.getLogger("skyferry.commands")
COMMANDS = ("pause", "resume", "flush", "priority")


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
        self.verifier: CommandVerifier | None = None  # None: every command is refused
        # Any client of the broker can publish on the cmd topic: refusals and ignored
        # commands are logged in a burst, then summarised (each is still counted, answered).
        self._refusals = Throttled(every_s=10.0, burst=20)

    async def apply(self, raw: bytes) -> dict[str, Any]:
        """Check and apply one command; returns the answer published as a `command` event."""
        if not self.enabled:
            name = name_of(raw)
            return self._answer(name, False, "commands are disabled on this site "
                                "([mqtt.status] commands = false); ignored", logging.WARNING,
                                result="ignored")
        try:
            if self.verifier is None:
                raise CommandRefused("untrusted", "no operator keys are configured",
                                     name_of(raw))
            cmd = await self.run_blocking(self.verifier.verify, raw)
        except CommandRefused as e:
            self.metrics.commands_refused.labels(e.reason).inc()
            return self._answer(e.name, False, f"refused ({e.reason}): {e}", logging.WARNING,
                                result="refused", fields={"reason": e.reason})
        answer = await self._apply(cmd)
        answer["nonce"] = cmd["nonce"]  # lets `skyferry command --wait` find its answer
        return answer

    async def _apply(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["cmd"]
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
        if result in ("refused", "ignored"):
            self._refusals.log(log, level, f"command_{result}", f"command {name}: {detail}",
                               command=name, **fields)
        else:
            log_event(log, level, f"command_{result}", f"command {name}: {detail}",
                      command=name, **fields)
        return {"event": "command", "cmd": name, "ok": ok, "result": result, "detail": detail,
                **fields}
