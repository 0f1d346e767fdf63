"""This process's TCP connections to a service, as the Linux kernel sees them.

obstore and the services' SDKs do not show their connections, so `Backend.connections` asks
the kernel: whether one waits out TCP's retransmission backoff after a silent outage, and how
long since the far end last acknowledged anything (agent/uplink/link_watch.py acts on both).
The kernel's socket diagnostics (netlink NETLINK_SOCK_DIAG, with `tcp_info`) say all of it;
/proc/net/tcp, the fallback, lacks the time of the last acknowledgement.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Connection:
    """One of this process's TCP connections to the backend, as the kernel sees it."""

    queued: int  # bytes written but not yet acknowledged by the far end
    retransmits: int  # retransmission timeouts in a row without an acknowledgement
    next_retransmit_s: float  # until the kernel tries again (0: no timer pending)
    connecting: bool  # still in the handshake (SYN sent)
    inode: int = 0  # the socket's inode: tells one connection from another across readings
    # Seconds since the far end last acknowledged anything (tcp_info's last_ack_recv); None:
    # not known (/proc only).
    since_ack_s: float | None = None
    rtt_s: float | None = None  # TCP's smoothed round trip on it (tcp_info); None: not known

    @property
    def stalled(self) -> bool:
        """Waiting out TCP's retransmission backoff rather than moving bytes."""
        return (self.queued > 0 or self.connecting) and self.retransmits >= 1


_TCP_ESTABLISHED, _TCP_SYN_SENT = "01", "02"
_USER_HZ = 100  # /proc/net/tcp gives timer values in clock ticks


def connections_to(port: int, proc: Path = Path("/proc/self")) -> list[Connection] | None:
    """This process's TCP connections to `port` with data under way (Linux).

    None when it cannot be told (no /proc): callers then assume nothing is stalled.
    """
    try:
        ours = {link[8:-1] for fd in os.listdir(proc / "fd")
                if (link := _readlink(proc / "fd" / fd)).startswith("socket:[")}
    except OSError:
        return None
    if proc == Path("/proc/self"):
        try:
            return [c for family in (socket.AF_INET, socket.AF_INET6)
                    for c in _diagnosed(family, port, {int(i) for i in ours})]
        except OSError:
            pass  # no netlink socket diagnostics here (a container may refuse them)
    return _from_proc(port, proc, ours)


def _from_proc(port: int, proc: Path, ours: set[str]) -> list[Connection] | None:
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
                                  connecting, int(f[9])))
    return out if seen else None


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # the descriptor was closed meanwhile
        return ""


# Netlink socket diagnostics (linux/inet_diag.h, linux/sock_diag.h, linux/tcp.h).
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLMSG_DONE, _NLMSG_ERROR = 4, 20, 3, 2
_DUMP_REQUEST = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
_INET_DIAG_INFO = 2
_ESTABLISHED, _SYN_SENT = 1, 2
_MSG = struct.Struct("=IHHII")  # nlmsghdr
# Offsets in struct tcp_info: tcpi_retransmits, tcpi_last_ack_recv (ms), tcpi_rtt (us).
_INFO_RETRANSMITS, _INFO_LAST_ACK_RECV, _INFO_RTT = 2, 8 + 12 * 4, 8 + 15 * 4


def _diagnosed(family: int, port: int, ours: set[int]) -> list[Connection]:
    """Established or connecting TCP sockets of `family` to `port` among inodes `ours`,
    with bytes unacknowledged or a handshake under way."""
    states = (1 << _ESTABLISHED) | (1 << _SYN_SENT)
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1), 0,
                          states) + bytes(48)
    out: list[Connection] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.send(_MSG.pack(_MSG.size + len(request), _SOCK_DIAG_BY_FAMILY, _DUMP_REQUEST, 1, 0)
                + request)
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + _MSG.size <= len(data):
                length, kind = _MSG.unpack_from(data, offset)[:2]
                if kind == _NLMSG_DONE:
                    return out
                if kind == _NLMSG_ERROR or length < _MSG.size:
                    raise OSError("socket diagnostics refused the request")
                found = _one(data[offset + _MSG.size:offset + length], port, ours)
                if found is not None:
                    out.append(found)
                offset += (length + 3) & ~3
            if not data:
                return out


def _one(msg: bytes, port: int, ours: set[int]) -> Connection | None:
    """One inet_diag_msg (and its tcp_info) as a Connection, if it is ours and busy."""
    if len(msg) < 72:
        return None
    state, timer = msg[1], msg[2]
    dport = struct.unpack_from(">H", msg, 6)[0]
    expires_ms, _, wqueue, _, inode = struct.unpack_from("=IIIII", msg, 52)
    if dport != port or inode not in ours:
        return None
    connecting = state == _SYN_SENT
    if wqueue == 0 and not connecting:
        return None  # idle (a pooled connection, or one awaiting its answer)
    info, at = b"", 72
    while at + 4 <= len(msg):
        size, kind = struct.unpack_from("=HH", msg, at)
        if size < 4:
            break
        if kind == _INET_DIAG_INFO:
            info = msg[at + 4:at + size]
        at += (size + 3) & ~3
    if len(info) < _INFO_RTT + 4:
        return None
    since_ack = struct.unpack_from("=I", info, _INFO_LAST_ACK_RECV)[0] / 1000
    rtt = struct.unpack_from("=I", info, _INFO_RTT)[0] / 1e6
    return Connection(wqueue, info[_INFO_RETRANSMITS],
                      expires_ms / 1000 if timer == 1 else 0.0, connecting, inode, since_ack,
                      rtt or None)
