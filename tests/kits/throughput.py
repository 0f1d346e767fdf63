"""Upload throughput through a capped, delayed link: the daemon uploads a pre-queued payload of
random bytes to an emulator through FaultProxy; goodput is the sealed bytes stored divided by
the time between the first and the last upstream byte leaving the capped link.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from agent.config.units import format_size
from tests.kits.emulators import Emulator, new_cloud
from tests.kits.site import Site

TARGET = 0.90


@dataclass(frozen=True)
class Measurement:
    backend: str
    payload: int  # plaintext bytes queued
    stored: int  # sealed bytes in the bucket (what had to cross the link)
    link_bytes: int  # every upstream byte over the capped link (HTTP heads, re-sends included)
    busy_s: float  # from the first to the last upstream byte leaving the capped link
    cap_bps: float  # bytes per second
    rtt_s: float
    streams: int

    @property
    def goodput_bps(self) -> float:
        return self.stored / self.busy_s

    @property
    def utilisation(self) -> float:
        return self.goodput_bps / self.cap_bps

    def summary(self) -> str:
        mbit = 8 / 1e6
        return (f"{format_size(self.payload)} to {self.backend} over {self.rtt_s * 1000:.0f} ms "
                f"RTT, cap {self.cap_bps * mbit:.1f} Mbit/s, {self.streams} streams: goodput "
                f"{self.goodput_bps * mbit:.2f} Mbit/s = {self.utilisation:.1%} of the cap "
                f"({self.stored} sealed bytes in {self.busy_s:.1f} s; "
                f"{self.link_bytes - self.stored} bytes of HTTP overhead)")


def measure(emulator: Emulator, workdir: Path, size: int, rtt_s: float = 0.04,
            cap_bps: float = 20e6 / 8, streams: int = 4, seed: int = 40) -> Measurement:
    """Queue `size` random bytes without the daemon, then time the daemon's upload."""
    cloud = new_cloud(workdir / "cloud", emulator, proxy=True)
    proxy = cloud.proxy
    assert proxy is not None
    try:
        proxy.delay_s = rtt_s / 2
        proxy.rate_bps = cap_bps
        site = Site(workdir / "site", backend=cloud.table,
                    extra={"uplink": {"streams": streams}})
        src = workdir / "payload.bin"
        src.write_bytes(random.Random(seed).randbytes(size))
        site.cli("put", "-c", str(site.config), str(src))  # no daemon: queued directly
        proxy.reset_counters()
        site.start()
        try:
            site.wait_drained(timeout=60 + 4 * size / cap_bps, expect_objects=1)
        finally:
            site.stop()
            site.close()
        first, last = proxy.first_delivered_at, proxy.last_delivered_at
        assert first is not None and last is not None
        return Measurement(emulator.kind, size, sum(cloud.objects().values()),
                           proxy.delivered_up, last - first, cap_bps, rtt_s, streams)
    finally:
        proxy.stop()
