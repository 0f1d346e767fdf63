"""This process's TCP connections to a service, as the Linux kernel sees them.

obstore does not show its connections, so `Backend.connections` asks /proc: whether one waits
out TCP's retransmission backoff after a silent outage (agent/uplink/link_watch.py acts on that).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
