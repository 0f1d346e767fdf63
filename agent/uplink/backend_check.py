"""Is the backend usable? Checked at start and at each window opening, shown in the status.

One cheap authenticated request (`Backend.check`: a listing of a prefix nothing is written
under) tells three answers apart:

- ok: the service knows the container or bucket and accepts the credentials;
- refused: a wrong container, wrong key, missing permission (PermanentBackendError). Logged
  as one line naming the backend, the container, the service's answer and the fix; uploads
  wait (nothing is claimed, the queue is untouched) until a check says ok again;
- unreachable: no answer (link down, DNS, timeout, 5xx). Normal for a satellite site between
  passes: not a refusal, uploads go on as usual (the gate and the retries handle the link).

The check runs at start whatever the gate says (an operator wants to know at once), then at
every window opening, and every `recheck_s` while refused and the gate is open, so a fixed key
file or a created container is noticed without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from agent.backends.protocol import Backend
from agent.errors import BackendError, PermanentBackendError
from agent.obs.logs import iso, log_event
from agent.obs.metrics import Metrics
from agent.uplink.gate import Clock, Gate

log = logging.getLogger("skyferry.backend")
State = Literal["unknown", "ok", "refused", "unreachable"]
STATES: tuple[State, ...] = ("unknown", "ok", "refused", "unreachable")
POLL_S = 0.5  # how often the gate's window count is looked at


@dataclass(frozen=True)
class BackendView:
    state: State
    reason: str | None
    checked_at: float | None  # wall-clock time of the last check (None: not yet)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason,
                "checked_at": None if self.checked_at is None else iso(self.checked_at)}


class BackendHealth:
    def __init__(self, backend: Backend, gate: Gate, metrics: Metrics, clock: Clock,
                 recheck_s: float) -> None:
        self.backend = backend
        self.gate = gate
        self.metrics = metrics
        self.clock = clock
        self.recheck_s = recheck_s
        self.view = BackendView("unknown", None, None)
        self.checks = 0
        # Set while uploads may run: not before the first answer, not while refused.
        self._usable = asyncio.Event()
        self._set_gauge()

    @property
    def state(self) -> State:
        return self.view.state

    def usable(self) -> bool:
        return self._usable.is_set()

    async def wait_usable(self) -> None:
        await self._usable.wait()

    async def check(self) -> BackendView:
        """Ask the service once; record, log (on a change) and return the answer."""
        self.checks += 1
        try:
            await self.backend.check()
        except PermanentBackendError as e:
            self._record("refused", str(e))
        except BackendError as e:
            self._record("unreachable", str(e))
        else:
            self._record("ok", None)
        return self.view

    def refused_upload(self, e: PermanentBackendError) -> None:
        """An upload was refused: logged like a refused check, and uploads wait for a check
        that says ok (at the next window opening, or within `recheck_s`)."""
        self._record("refused", str(e))

    async def run(self) -> None:
        await self.check()
        seen = self.gate.windows_opened
        last = time.monotonic()
        while True:
            await asyncio.sleep(POLL_S)
            opened = self.gate.windows_opened != seen
            seen = self.gate.windows_opened
            due = (self.state == "refused" and self.gate.is_open()
                   and time.monotonic() - last >= self.recheck_s)
            if opened or due:
                # New connections, and secrets read again: a fixed key file is picked up.
                self.backend.renew()
                await self.check()
                last = time.monotonic()

    def _record(self, state: State, reason: str | None) -> None:
        before = self.view.state
        self.view = BackendView(state, reason, self.clock())
        if state == "refused":
            self._usable.clear()
        else:
            self._usable.set()
        self._set_gauge()
        if state != before:
            self._log(state, reason)

    def _log(self, state: State, reason: str | None) -> None:
        url = self.backend.url
        if state == "refused":
            log_event(log, logging.ERROR, "backend_refused",
                      f"backend refused: {reason}; uploads wait and the queue is kept; the "
                      "backend is checked again at each window opening",
                      backend=url, where=self.backend.where)
        elif state == "unreachable":
            log_event(log, logging.WARNING, "backend_unreachable",
                      f"backend did not answer its check: {reason}; normal while the link "
                      "is down, it is checked again at the next window",
                      backend=url, where=self.backend.where)
        else:
            log_event(log, logging.INFO, "backend_ok",
                      f"backend {url} ({self.backend.where}) accepts these credentials",
                      backend=url, where=self.backend.where)

    def _set_gauge(self) -> None:
        for s in STATES:
            self.metrics.backend_state.labels(s).set(1 if s == self.view.state else 0)
