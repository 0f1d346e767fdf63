"""The fleet view's reading of heartbeats (agent/cloud/fleet.py) against what a bucket may hold:
old heartbeats found month by month, forged, replayed and junk ones reported and never trusted,
and bounded work per refresh that still gets to the trusted one."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.backends.registry import open_backend
from agent.cloud.fleet import MAX_OPENED, MAX_REPORTED, FleetWatch
from agent.cloud.restore import site_key_loader
from agent.format.crypto import EdgeKeys
from agent.format.heartbeat import Forecast, Heartbeat, heartbeat_key, seal_heartbeat
from agent.format.keys import generate_keys, load_edge_keys, load_recipient_private

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
DAY = 86400.0


class Fleet:
    def __init__(self, root: Path) -> None:
        self.cloud = root / "cloud"
        self.cloud.mkdir()
        gen = generate_keys(root / "keys", "s1")
        e = gen.edge_dir
        self.edge = load_edge_keys(e / "recipient.pub", e / "site.key", e / "dedup.key")
        self.key_dir = gen.cloud_dir
        self.watch = FleetWatch(open_backend(f"file://{self.cloud}"), None,
                                load_recipient_private(gen.cloud_dir / "recipient.key"),
                                site_key_loader(gen.cloud_dir), gen.cloud_dir,
                                more_sites=lambda: ["keyless"], clock=lambda: NOW)
        self.seq = 0

    def put(self, ago_s: float, edge: EdgeKeys | None = None) -> str:
        self.seq += 1
        created = (NOW - timedelta(seconds=ago_s)).isoformat(timespec="microseconds")
        hb = Heartbeat("s1", self.seq, created, "1.0", {}, None, 1, 0, 0, {},
                       Forecast(None, None), 600.0)
        path = self.cloud / hb.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(seal_heartbeat(hb, edge or self.edge))
        return hb.key

    def junk(self, ago_s: float, n: int) -> list[str]:
        keys = [heartbeat_key("s1", NOW - timedelta(seconds=ago_s - i), 10**6 + i)
                for i in range(n)]
        for k in keys:
            (self.cloud / k).parent.mkdir(parents=True, exist_ok=True)
            (self.cloud / k).write_bytes(b"{}" * 100)
        return keys

    async def refresh(self, full: bool = True) -> dict[str, object]:
        await self.watch.refresh(full=full)
        return {v.site: v for v in self.watch.sites.values()}


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


async def test_an_old_heartbeat_is_found_and_the_site_is_silent_a_forged_newer_one_reported(
        fleet: Fleet) -> None:
    old = fleet.put(40 * DAY)  # two month folders back
    forger = EdgeKeys(fleet.edge.recipient_public, Ed25519PrivateKey.generate(), bytes(32))
    forged = fleet.put(60, forger)
    await fleet.refresh()
    s1 = fleet.watch.sites["s1"]
    assert s1.heartbeat_key == old and s1.status(NOW.timestamp(), DAY) == "silent"
    assert [k for k, _ in s1.untrusted] == [forged]
    assert "does not verify" in s1.untrusted[0][1]
    keyless = fleet.watch.sites["keyless"]
    assert keyless.key_problem and keyless.status(NOW.timestamp(), DAY) == "never"
    # A poll (not a full refresh) finds a new heartbeat in the recent folders.
    new = fleet.put(5)
    await fleet.refresh(full=False)
    assert s1.heartbeat_key == new and s1.status(NOW.timestamp(), DAY) == "ok"
    assert s1.untrusted == [], "the forged one is older than what is trusted now"


async def test_a_heartbeat_copied_to_a_newer_name_is_reported_not_trusted(fleet: Fleet) -> None:
    real = fleet.put(3 * DAY)
    replay = heartbeat_key("s1", NOW - timedelta(seconds=10), 99)
    (fleet.cloud / replay).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fleet.cloud / real, fleet.cloud / replay)
    await fleet.refresh()
    s1 = fleet.watch.sites["s1"]
    assert s1.heartbeat_key == real
    assert s1.untrusted == [(replay, f"heartbeat {real} was moved here")]


async def test_junk_costs_bounded_work_per_refresh_and_the_trusted_one_is_still_reached(
        fleet: Fleet) -> None:
    real = fleet.put(3 * DAY)
    junk = fleet.junk(100, MAX_OPENED + 4)
    await fleet.refresh()
    s1 = fleet.watch.sites["s1"]
    assert s1.heartbeat is None, f"at most {MAX_OPENED} objects are opened per refresh"
    assert s1.status(NOW.timestamp(), DAY) == "never" and len(s1.untrusted) == MAX_REPORTED
    await fleet.refresh()
    assert s1.heartbeat_key == real, "the next full refresh skips what it reported"
    assert {k for k, _ in s1.untrusted} <= set(junk) and len(s1.untrusted) == MAX_REPORTED
    assert all("bad magic" in why or "truncated" in why for _, why in s1.untrusted)
