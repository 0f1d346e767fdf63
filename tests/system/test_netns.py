"""A real network path: the daemon in its own network namespace behind a veth link with a `tbf`
rate limit, the link set down in the middle of the upload, then up again.

Addresses are a /30 on a veth pair this test creates and deletes; traffic never leaves the
machine. Needs root (CAP_NET_ADMIN) and `ip`/`tc`; skips with the reason when namespaces cannot
be made. `netem` is not in this kernel, so there is no added delay here (the fault proxy tests
cover delay).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kits.emulators import Cloud, Emulator
from tests.kits.faultproxy import FaultProxy
from tests.kits.site import Site, drop_file, tree_digest

MIB = 1 << 20
RATE_MBIT = 40


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@dataclass
class Netns:
    name: str
    host_dev: str  # the root namespace's end of the veth pair
    host_addr: str
    ns_addr: str

    @property
    def wrap(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)


@pytest.fixture
def netns() -> Iterator[Netns]:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    tag = uuid.uuid4().hex[:6]
    name, host_dev, ns_dev = f"sf-{tag}", f"sfh{tag}", f"sfc{tag}"
    made = ip("netns", "add", name, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    net = random.Random(tag).randrange(256)
    host_addr, ns_addr = f"10.231.{net}.1", f"10.231.{net}.2"
    try:
        ip("link", "add", host_dev, "type", "veth", "peer", "name", ns_dev)
        ip("link", "set", ns_dev, "netns", name)
        ip("addr", "add", f"{host_addr}/30", "dev", host_dev)
        ip("link", "set", host_dev, "up")
        inside = ("netns", "exec", name, "ip")
        ip(*inside, "addr", "add", f"{ns_addr}/30", "dev", ns_dev)
        ip(*inside, "link", "set", ns_dev, "up")
        ip(*inside, "link", "set", "lo", "up")
        # The uplink direction (namespace -> host) is rate-limited, as a satellite return is.
        subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", ns_dev, "root",
                        "tbf", "rate", f"{RATE_MBIT}mbit", "burst", "64kb", "latency", "50ms"],
                       check=True, capture_output=True, timeout=20)
        yield Netns(name, host_dev, host_addr, ns_addr)
    finally:
        ip("netns", "del", name, check=False)  # takes the veth pair with it
        ip("link", "del", host_dev, check=False)


def test_tbf_limited_link_set_down_mid_upload_loses_nothing(
        netns: Netns, moto: Emulator, make_cloud: Callable[..., Cloud],
        make_site: Callable[..., Site], tmp_path: Path) -> None:
    cloud = make_cloud("moto")
    # The emulator listens on loopback; a proxy on the veth address bridges to it and counts.
    with FaultProxy("127.0.0.1", moto.port, listen_host=netns.host_addr) as proxy:
        table = {**cloud.table, "endpoint": proxy.endpoint, "timeout": "20s"}
        site = make_site(backend=table, extra={"uplink": {"retry_initial": "200ms",
                                                          "retry_max": "2s"}})
        payload = random.Random(7).randbytes(24 * MIB)
        drop_file(site.spool(), "big.bin", payload)
        site.start(wrap=netns.wrap)

        def wait_bytes(n: int, timeout: float) -> float:
            deadline = time.monotonic() + timeout
            while proxy.delivered_up < n:
                assert time.monotonic() < deadline, f"stuck at {proxy.delivered_up}:\n" + (
                    site.log_tail())
                assert site.proc is not None and site.proc.poll() is None, site.log_tail()
                time.sleep(0.02)
            return time.monotonic()

        t1 = wait_bytes(2 * MIB, 60)
        t2 = wait_bytes(6 * MIB, 30)
        rate_mbit = 4 * MIB * 8 / 1e6 / (t2 - t1)
        ip("link", "set", netns.host_dev, "down")
        time.sleep(0.5)  # what was in flight drains
        during = proxy.delivered_up
        time.sleep(3)
        frozen = proxy.delivered_up - during
        ip("link", "set", netns.host_dev, "up")
        site.wait_drained(timeout=90, expect_objects=1)
        site.stop()
    retries = sum(1 for e in site.log_events() if e.get("event") == "upload_retry")
    print(f"\nveth with tbf {RATE_MBIT} Mbit/s: measured {rate_mbit:.1f} Mbit/s; "
          f"{frozen} bytes crossed while the link was down; {retries} upload retries")
    assert rate_mbit <= RATE_MBIT * 1.1, "tbf did not limit the rate"
    assert frozen == 0, "bytes crossed a link that was down"
    # The proxy is gone: restore and verify go straight to the emulator.
    direct = ("--backend", cloud.url, "--backend-config", str(cloud.write_config(cloud.direct)),
              "--key", str(site.recipient_key), "--json")
    out = tmp_path / "out"
    report = json.loads(site.cli("restore", *direct, "--to", str(out)).stdout)
    assert report["ok"] and report["objects_ok"] == 1
    assert list(tree_digest(out)) == [f"{site.site_id}/files/big.bin"]
    assert (out / site.site_id / "files" / "big.bin").read_bytes() == payload
    assert json.loads(site.cli("verify", *direct).stdout)["ok"]
