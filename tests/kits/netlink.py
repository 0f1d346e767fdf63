"""A slow, cuttable link on this machine: a veth pair into a fresh network namespace, `tbf` on
the uplink, and cuts on demand (the far end down, or an nftables black hole). Needs root,
iproute2 and nftables; LinkUnavailable says why not.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import uuid


def _run(cmd: list[str], check: bool = True, stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


class LinkUnavailable(RuntimeError):
    """This machine cannot build the benchmark link (no root, no netns, no tc or nft)."""


class Link:
    """A veth pair into a fresh network namespace, tbf on the uplink, cuts on demand."""

    def __init__(self, rate_bps: float) -> None:
        self.rate_bps = rate_bps  # bytes per second
        tag = uuid.uuid4().hex[:6]
        self.ns, self.host_dev, self.ns_dev = f"sfl-{tag}", f"sflh{tag}", f"sflc{tag}"
        self.table = f"sfl_bh_{tag}"
        self.host_addr = self.ns_addr = ""
        self.state = "up"
        self._made = False

    @property
    def wrap(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns)

    def _free_net(self) -> int:
        used = _run(["ip", "-o", "-4", "addr", "show"]).stdout
        for _ in range(100):
            net = random.randrange(256)
            if f"10.232.{net}." not in used:
                return net
        raise LinkUnavailable("no free 10.232.x.0/30 network for the benchmark link")

    def __enter__(self) -> Link:
        for tool in ("ip", "tc", "nft"):
            if shutil.which(tool) is None:
                raise LinkUnavailable(f"`{tool}` is not installed (iproute2, nftables)")
        made = _run(["ip", "netns", "add", self.ns], check=False)
        if made.returncode != 0:
            raise LinkUnavailable(f"cannot create a network namespace: {made.stderr.strip()}")
        self._made = True
        try:
            net = self._free_net()
            self.host_addr, self.ns_addr = f"10.232.{net}.1", f"10.232.{net}.2"
            inside = ["ip", "netns", "exec", self.ns]
            _run(["ip", "link", "add", self.host_dev, "type", "veth", "peer", "name",
                  self.ns_dev])
            _run(["ip", "link", "set", self.ns_dev, "netns", self.ns])
            _run(["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_dev])
            _run(["ip", "link", "set", self.host_dev, "up"])
            _run([*inside, "ip", "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_dev])
            _run([*inside, "ip", "link", "set", self.ns_dev, "up"])
            _run([*inside, "ip", "link", "set", "lo", "up"])
            # The uplink (namespace -> host) is the slow direction, as a terminal's return is.
            # Bucket: 5 ms of the rate, at least 16 KiB; queue: 50 ms of the rate.
            burst = max(16 << 10, int(self.rate_bps * 0.005))
            _run([*inside, "tc", "qdisc", "add", "dev", self.ns_dev, "root", "tbf", "rate",
                  f"{int(self.rate_bps * 8)}bit", "burst", str(burst), "latency", "50ms"])
            self._nft_probe()
        except BaseException:
            self.close()
            raise
        return self

    def _nft_probe(self) -> None:
        """Fail now, not at the first black hole, when nftables cannot be used here."""
        r = _run(["nft", "-f", "-"], check=False,
                 stdin=f"table inet {self.table}\ndelete table inet {self.table}\n")
        if r.returncode != 0:
            raise LinkUnavailable(f"nftables does not work here: {r.stderr.strip()}")

    def _nft(self, inside: bool, script: str) -> None:
        cmd = [*self.wrap, "nft", "-f", "-"] if inside else ["nft", "-f", "-"]
        _run(cmd, stdin=script)

    def cut(self, kind: str) -> None:
        if kind == "down":
            _run(["ip", "link", "set", self.host_dev, "down"])
        else:
            # Drop on arrival at both ends (prerouting, IP only): senders see nothing at all.
            for inside, dev in ((False, self.host_dev), (True, self.ns_dev)):
                self._nft(inside, f"table inet {self.table} {{\n chain pre {{\n"
                          "  type filter hook prerouting priority -300; policy accept;\n"
                          f'  iifname "{dev}" drop\n }}\n}}\n')
        self.state = kind

    def restore(self) -> None:
        if self.state == "down":
            _run(["ip", "link", "set", self.host_dev, "up"])
        elif self.state == "blackhole":
            for inside in (False, True):
                self._nft(inside, f"delete table inet {self.table}\n")
        self.state = "up"

    def close(self) -> None:
        if not self._made:
            return
        with contextlib.suppress(Exception):
            self.restore()
        _run(["nft", "delete", "table", "inet", self.table], check=False)
        _run(["ip", "netns", "del", self.ns], check=False)  # takes the veth pair with it
        _run(["ip", "link", "del", self.host_dev], check=False)
        self._made = False

    def __exit__(self, *exc: object) -> None:
        self.close()
