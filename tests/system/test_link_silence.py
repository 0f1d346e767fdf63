"""Loss of link noticed from the uplink's own traffic: under a black hole (nftables drops every
packet, both ends stay up, TCP sees only silence) while chunks are on the wire, the gate
closes within 1.5 s (the probes alone take seconds), and once the link is back everything is
delivered, the cut chunks resumed.

The daemon runs in its own network namespace behind a veth pair with a `tbf` rate limit
(tests/kits/netlink.py); the fault proxy on the host end adds 40 ms of round trip in front of
Azurite. Skips with the reason when this machine cannot build the link (no root, no network
namespaces, no tc or nft).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from agent.backends.azure import AZURITE_ACCOUNT, AZURITE_KEY
from tests.kits.emulators import Emulator
from tests.kits.faultproxy import FaultProxy
from tests.kits.netlink import Link, LinkUnavailable
from tests.kits.site import Site

MiB = 1 << 20
RATE_BPS = 1_000_000  # 8 Mbit/s: a few seconds of sending, so the cut lands mid-upload
GATE_CLOSE_S = 1.5


@pytest.fixture
def link() -> Iterator[Link]:
    try:
        with Link(RATE_BPS) as made:
            yield made
    except LinkUnavailable as e:
        pytest.skip(f"cannot build a network namespace link here: {e}")


def _first(site: Site, event: str, after: float) -> float | None:
    """Wall-clock time of the first `event` in the daemon's log at or after `after`."""
    for ev in site.log_events():
        if ev.get("event") == event:
            at = datetime.fromisoformat(str(ev["ts"])).timestamp()
            if at >= after:
                return at
    return None


def _wait(cond: Callable[[], bool], timeout: float, what: str, site: Site) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g}s:\n{site.log_tail()}")
        time.sleep(0.05)


def test_gate_closes_soon_after_a_black_hole_begins(link: Link, azurite: Emulator,
                                                    tmp_path: Path) -> None:
    container = azurite.create_bucket()
    key_file = tmp_path / "azure.key"
    key_file.write_text(AZURITE_KEY + "\n")
    key_file.chmod(0o600)
    with FaultProxy("127.0.0.1", azurite.port, listen_host=link.host_addr) as proxy:
        proxy.delay_s = 0.02
        site = Site(tmp_path / "site", site_id="silence", backend={
            "url": f"azure://{container}", "endpoint": f"{proxy.endpoint}/{AZURITE_ACCOUNT}",
            "allow_http": True, "account": AZURITE_ACCOUNT, "account_key_file": str(key_file)})
        spool = site.spool()
        spool.mkdir(parents=True, exist_ok=True)
        (spool / "incompressible.bin").write_bytes(os.urandom(4 * MiB))
        try:
            site.start(wrap=link.wrap)
            _wait(lambda: proxy.bytes_up > MiB // 2, 30, "no upload got going", site)
            cut_at = time.time()
            link.cut("blackhole")
            try:
                _wait(lambda: _first(site, "link_down", cut_at) is not None, 6,
                      "the gate did not close", site)
            finally:
                time.sleep(max(0.0, cut_at + 2.5 - time.time()))
                link.restore()
            closed = _first(site, "link_down", cut_at)
            assert closed is not None
            print(f"\ngate closed {closed - cut_at:.2f} s after the black hole began")
            assert closed - cut_at <= GATE_CLOSE_S, site.log_tail()
            assert _first(site, "link_silent", cut_at) is not None, (
                "closed by the probes, not by the uplink's own connections")
            site.wait_drained(timeout=40, expect_objects=1)
            assert _first(site, "link_up", cut_at) is not None
        finally:
            if site.proc is not None:
                site.stop()
            site.close()
