"""sd_notify: READY, STATUS, WATCHDOG (from the event loop), RELOADING and STOPPING.

The protocol is one datagram of `KEY=VALUE` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a leading `@` means the abstract namespace), so it is implemented here in a few
lines rather than with a package: python-systemd needs libsystemd headers to build, and the
small pure-Python ones add nothing this does not do.

The watchdog ping is sent by a task on the event loop, so a blocked loop stops the pings and
systemd (WatchdogSec=) restarts the service; that is the point of sending it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping

log = logging.getLogger("skyferry.notify")


class Notifier:
    """Talks to the service manager; every method is a no-op when not run under one."""

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s  # the manager's timeout; we ping at half of it
        self._sock: socket.socket | None = None
        self._warned = False
        self.sent = 0
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int) -> Notifier:
        """Read $NOTIFY_SOCKET and $WATCHDOG_USEC (honouring $WATCHDOG_PID) once, at start."""
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog_s = None
        usec = environ.get("WATCHDOG_USEC", "")
        wd_pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(pid)):
            watchdog_s = int(usec) / 1e6
        return cls(address, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification: send(READY=1, STATUS="...")."""
        if self._sock is None or self.address is None:
            return False
        text = "\n".join(f"{k}={_one_line(str(v))}" for k, v in fields.items())
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._sock.sendto(text.encode(), addr)
        except OSError as e:
            if not self._warned:  # the manager went away: say so once, carry on
                self._warned = True
                log.warning("cannot notify the service manager at %s: %s", self.address, e)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, STATUS="reloading configuration")

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping: draining in-flight work")

    async def watchdog_loop(self) -> None:
        """Ping at half the manager's timeout, for as long as the event loop runs."""
        if self.watchdog_s is None or not self.enabled:
            return
        interval = self.watchdog_s / 2
        while True:
            self.send(WATCHDOG=1)
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
