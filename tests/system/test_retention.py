"""Retention (issue 16, acceptance 7; docs/FORMAT.md "Retention"): the lander deletes the sealed
objects it has landed once they are `delete_sealed_after` old, and a manifest that waited 40 days
at the site, referencing by dedup chunks first uploaded on day 1, still lands byte-identical.

Real components: the site's store, pipeline and uplink, a folder backend as the sealed store and
another as the destination, the lander with its retention pass. Time is simulated, not slept:
the edge runs on an injected clock, and the cloud's Last-Modified of what was uploaded on day N
is set to day N (the folder backend's Last-Modified is the file's mtime). "Now" is the real time,
day 41, which is also what the lander's clock probe reads from the storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.backends.registry import open_backend
from agent.cloud.land import Lander, LandReport
from agent.cloud.land_retention import Retention
from agent.cloud.restore import site_key_loader
from agent.config.settings import (
    DEFAULT_CLASSES,
    ChunkingSettings,
    CompressionSettings,
    UplinkSettings,
    WindowSettings,
)
from agent.format.keys import generate_keys, load_edge_keys, load_recipient_private
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest
from agent.obs.metrics import Metrics
from agent.store.store import Store
from agent.uplink.gate import Gate
from agent.uplink.uplink import Uplink
from agent.windows.schedule import Schedule
from tests.kits.restore import run_cli
from tests.kits.site import render_toml

SITE = "camp-retain"
DAY = 86400.0
HORIZON = 30 * DAY
GRACE = 31 * DAY  # delete_sealed_after: the horizon plus the default margin of one day
CHUNKING = ChunkingSettings(min_size=4 << 10, avg_size=16 << 10, max_size=64 << 10)


@dataclass
class Site:
    root: Path
    store: Store
    pipeline: Pipeline
    clock_offset: float  # the edge clock's error: the same decisions whatever it is
    now: float = 0.0  # simulated real time

    @property
    def cloud(self) -> Path:
        return self.root / "cloud"

    def edge_clock(self) -> float:
        return self.now + self.clock_offset

    def ingest(self, name: str, data: bytes) -> str:
        path = self.root / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.pipeline.ingest_file(IngestRequest(path, "files", name, "normal")).object_id

    def upload(self, *, refresh: bool = True) -> Uplink:
        """The real uplink, on the simulated clock, until the queue is empty; what it wrote
        gets the simulated time as its Last-Modified."""
        before = set(files(self.cloud))
        gate = Gate(Schedule(WindowSettings(mode="always"), anchor=time.time()), time.time)

        async def run_blocking(fn: object, *args: object) -> object:
            return await asyncio.to_thread(fn, *args)  # type: ignore[arg-type]

        async def drain() -> Uplink:
            uplink = Uplink(SITE, self.store, open_backend(f"file://{self.cloud}"), gate,
                            UplinkSettings(retry_initial_s=0.02, retry_max_s=0.1),
                            run_blocking, Metrics(), self.edge_clock)
            if not refresh:
                uplink.horizon = None  # the control: the edge half of the rule switched off
            task = asyncio.create_task(uplink.run())
            deadline = time.monotonic() + 20
            try:
                while self.store.pending_objects():
                    assert time.monotonic() < deadline, "the uplink did not drain"
                    assert not task.done(), task
                    await asyncio.sleep(0.02)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await uplink.drain_acks()
            return uplink

        uplink = asyncio.run(drain())
        for path in set(files(self.cloud)) - before:
            os.utime(path, (self.now, self.now))
        return uplink

    def chunk_ids(self, object_id: str) -> set[str]:
        db = sqlite3.connect(self.root / "state" / "index.sqlite")
        try:
            return {r[0] for r in db.execute(
                "SELECT chunk_id FROM object_chunks WHERE object_id=?", (object_id,))}
        finally:
            db.close()


def files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def keys_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in files(folder)}


def make_site(root: Path, horizon: float | None, clock_offset: float = 0.0) -> Site:
    keys = generate_keys(root / "keys", SITE)
    edge = load_edge_keys(keys.edge_dir / "recipient.pub", keys.edge_dir / "site.key",
                          keys.edge_dir / "dedup.key")
    store = Store(root / "state", DEFAULT_CLASSES)
    pipeline = Pipeline(SITE, edge, store, CHUNKING, CompressionSettings(),
                        dedup_horizon_s=horizon)
    return Site(root, store, pipeline, clock_offset)


def lander(site: Site, grace: float | None) -> Lander:
    key = site.root / "keys" / "cloud" / "recipient.key"
    work = site.root / "work"
    work.mkdir(exist_ok=True)
    out = Lander(open_backend(f"file://{site.cloud}"), open_backend(f"file://{site.root}/lake"),
                 load_recipient_private(key), site_key_loader(key.parent), work, parallel=4)
    if grace is not None:
        out.retention = Retention(out.backend, out.dest, out, grace, DAY, out.worker)
    return out


def land(site: Site, grace: float | None) -> tuple[LandReport, Lander]:
    one = lander(site, grace)
    return asyncio.run(one.land_once()), one


@pytest.fixture
def scenario(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Site, bytes, str,
                                                                                 str]]:
    """Day 1: object A is ingested, uploaded and landed. Day 2: object B, A's bytes and more,
    is ingested (dedup against A's chunks) and waits at the site. Now is day 41."""
    horizon, offset = request.param
    site = make_site(tmp_path, horizon, offset)
    day0 = time.time() - 41 * DAY
    site.now = day0 + 1 * DAY
    a_data = os.urandom(300_000)
    a = site.ingest("survey/a.bin", a_data)
    site.upload()
    report, _ = land(site, None)
    assert report.files == 1 and not report.quarantined, report
    site.now = day0 + 2 * DAY
    b_data = a_data + os.urandom(100_000)
    b = site.ingest("survey/b.bin", b_data)
    assert site.chunk_ids(a) & site.chunk_ids(b), "B references chunks of day 1 by dedup"
    site.now = day0 + 41 * DAY
    yield site, b_data, a, b
    site.store.close()


# The edge clock's offset cancels (both times the site compares are its own); an offset
# either way is in tests/unit/test_retention_rule.py, a clock 3 days slow here.
HORIZON_ON = [(HORIZON, 0.0), (HORIZON, -3 * DAY)]


@pytest.mark.parametrize("scenario", HORIZON_ON, indirect=True,
                         ids=["edge-clock-right", "edge-clock-3d-behind"])
def test_a_manifest_that_waited_40_days_lands_after_the_lander_deleted_what_it_could(
        scenario: tuple[Site, bytes, str, str]) -> None:
    site, b_data, a, b = scenario
    sealed_a = {k for k in keys_under(site.cloud)
                if a in k or k.split("/")[-1] in site.chunk_ids(a)}
    assert len(sealed_a) == len(site.chunk_ids(a)) + 1, "A's chunks and its manifest"
    # The lander, on day 41, before B arrives: A is landed and 40 days old: it goes.
    _, first = land(site, GRACE)
    assert first.retention is not None and first.retention.last is not None
    deleted = set(first.retention.last.deleted)
    assert sealed_a <= deleted, "the lander deleted A's chunks and manifest (old, landed)"
    assert not deleted & keys_under(site.cloud), "and they are gone from the sealed store"
    assert any(k.startswith("_skyferry/retention/") for k in keys_under(site.root / "lake"))
    # The site sends B at last: its chunks of day 1 are past the horizon, so they go again.
    uplink = site.upload()
    early = lander(site, GRACE).retention
    assert early is not None
    assert "not landed yet" in asyncio.run(early.run([SITE])).kept[SITE], \
        "a manifest not landed yet keeps everything of its site"
    assert uplink.horizon is not None and uplink.horizon.resent == len(
        site.chunk_ids(a) & site.chunk_ids(b))
    report, second = land(site, GRACE)
    assert report.files == 1 and not report.quarantined, report.quarantined
    assert (site.root / "lake" / SITE / "files/survey/b.bin").read_bytes() == b_data
    assert (site.root / "lake" / SITE / "files/survey/a.bin").stat().st_size == 300_000
    assert second.retention is not None and second.retention.last is not None
    assert not second.retention.last.deleted, "nothing of B is old enough"


@pytest.mark.parametrize("scenario", [(HORIZON, 0.0)], indirect=True)
def test_without_the_edge_re_sending_the_same_manifest_would_be_lost(
        scenario: tuple[Site, bytes, str, str]) -> None:
    """The control: the hazard is real, and the test above would catch it."""
    site, _, _, _ = scenario
    land(site, GRACE)
    site.upload(refresh=False)
    report, _ = land(site, GRACE)
    assert report.files == 0 and len(report.quarantined) == 1
    assert "missing" in report.quarantined[0].reason


@pytest.mark.parametrize("scenario", [(HORIZON, 0.0), (None, 0.0)], indirect=True,
                         ids=["lander-retention-off", "site-declares-no-horizon"])
def test_nothing_is_deleted_with_retention_off_or_a_site_without_a_horizon(
        scenario: tuple[Site, bytes, str, str], request: pytest.FixtureRequest) -> None:
    site, b_data, _, _ = scenario
    site_has_horizon = request.node.callspec.id == "lander-retention-off"
    grace = None if site_has_horizon else GRACE
    before = keys_under(site.cloud)
    _, first = land(site, grace)
    site.upload()
    report, _ = land(site, grace)
    assert report.files == 1 and not report.quarantined
    assert (site.root / "lake" / SITE / "files/survey/b.bin").read_bytes() == b_data
    assert before <= keys_under(site.cloud), "every sealed object is still there"
    if not site_has_horizon:
        assert first.retention is not None and first.retention.last is not None
        assert "no dedup horizon" in first.retention.last.kept[SITE]


@pytest.mark.parametrize("scenario", [(HORIZON, 0.0)], indirect=True)
def test_skyferry_land_with_delete_sealed_after_deletes_and_records_it(
        scenario: tuple[Site, bytes, str, str]) -> None:
    """The same pass through the command and land.toml, as an operator runs it."""
    site, _, a, _ = scenario
    cfg = site.root / "land.toml"
    cfg.write_text(render_toml({
        "source": {"url": f"file://{site.cloud}"}, "dest": {"url": f"file://{site.root}/lake"},
        "land": {"key": str(site.root / "keys/cloud/recipient.key"),
                 "work_dir": str(site.root / "work"), "delete_sealed_after": "31d"}}))
    before = keys_under(site.cloud)
    r = run_cli("land", "-c", str(cfg), "--once", "--json")
    assert r.returncode == 0, r.stderr
    gone = before - keys_under(site.cloud)
    assert len(gone) == len(site.chunk_ids(a)) + 1 and any(a in k for k in gone)
    records = [json.loads(p.read_bytes())
               for p in (site.root / "lake" / "_skyferry" / "retention").rglob("*.json")]
    assert [sorted(r["deleted"]) for r in records] == [sorted(gone)]
