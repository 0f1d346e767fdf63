"""History integrity (issue 14): numbered manifests, tips, and what verify/restore make of them.

Everything is real: the pipeline seals into a store, the uplink (its workers and its tip loop,
gate always open) uploads into a local-folder backend, and `Restorer.run` (what `skyferry
verify` and `restore` run) reads it back. The bucket is then damaged the way an attacker with
no keys can: delete, move, copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.backends.registry import open_backend
from agent.cloud.restore import Restorer, site_key_loader
from agent.cloud.restore_read import RestoreReport
from agent.config.settings import (
    DEFAULT_CLASSES,
    ChunkingSettings,
    ClassSettings,
    CompressionSettings,
    UplinkSettings,
    WindowSettings,
)
from agent.errors import RestoreError
from agent.format import crypto, layout
from agent.format.codec import decompress
from agent.format.keys import (
    GeneratedKeys,
    generate_keys,
    load_edge_keys,
    load_recipient_private,
    load_verify_key,
)
from agent.format.manifest import Manifest, uuid7
from agent.format.tips import Tip, coarsen, open_tip, parse_tip_key
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest, IngestResult
from agent.obs.metrics import Metrics
from agent.store import schema
from agent.store.store import Store
from agent.uplink import tips
from agent.uplink.gate import Gate
from agent.uplink.uplink import Uplink
from agent.windows.schedule import Schedule

SITE = "camp-alpha"
CHUNKING = ChunkingSettings(min_size=4 << 10, avg_size=16 << 10, max_size=64 << 10)


@dataclass
class Rig:
    """One site (store, pipeline, uplink) and its cloud folder."""

    root: Path
    keys: GeneratedKeys
    edge: crypto.EdgeKeys
    store: Store
    pipeline: Pipeline

    @property
    def cloud(self) -> Path:
        return self.root / "cloud"

    def reopen(self, classes: tuple[ClassSettings, ...] = DEFAULT_CLASSES,
               quota: int | None = None) -> None:
        self.store.close()
        self.store = Store(self.root / "state", classes, quota)
        self.pipeline = Pipeline(SITE, self.edge, self.store, CHUNKING, CompressionSettings())

    def ingest(self, name: str, data: bytes, priority: str = "normal") -> IngestResult:
        path = self.root / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.pipeline.ingest_file(IngestRequest(path, "files", name, priority))

    async def upload(self) -> None:
        """Run the real uplink until the queue is empty and its tip loop has told the cloud."""
        gate = Gate(Schedule(WindowSettings(mode="always"), anchor=time.time()), time.time)

        async def run_blocking(fn: object, *args: object) -> object:
            return await asyncio.to_thread(fn, *args)  # type: ignore[arg-type]

        uplink = Uplink(SITE, self.store, open_backend(f"file://{self.cloud}"), gate,
                        UplinkSettings(retry_initial_s=0.02, retry_max_s=0.1), run_blocking,
                        Metrics(), time.time, keys=self.edge)
        interval, tips.TIP_INTERVAL_S = tips.TIP_INTERVAL_S, 0.1  # the test waits for tips
        task = asyncio.create_task(uplink.run())
        assert uplink.tips is not None
        deadline = time.monotonic() + 30
        try:
            while self.store.pending_objects() or uplink.tips.build() is not None:
                assert time.monotonic() < deadline, "the uplink did not drain and send its tip"
                assert not task.done(), task
                await asyncio.sleep(0.05)
        finally:
            tips.TIP_INTERVAL_S = interval
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await uplink.drain_acks()

    def restorer(self) -> Restorer:
        return Restorer(open_backend(f"file://{self.cloud}"),
                        load_recipient_private(self.keys.cloud_dir / "recipient.key"),
                        site_key_loader(self.keys.cloud_dir), parallel=4)

    def verify(self, since: datetime | None = None) -> RestoreReport:
        return asyncio.run(self.restorer().run(None, since=since))

    def manifests(self) -> dict[int, Path]:
        """seq -> file of each numbered manifest in the cloud (opened with the cloud keys)."""
        out: dict[int, Path] = {}
        for path in (self.cloud / SITE / "manifests").rglob("*"):
            if path.is_file():
                m = open_manifest(self, path.read_bytes())
                out[m.seq] = path
        return out

    def tips(self) -> list[Tip]:
        recipient = load_recipient_private(self.keys.cloud_dir / "recipient.key")
        out = []
        for path in sorted((self.cloud / SITE / "tips").rglob("*")):
            if path.is_file():
                key = path.relative_to(self.cloud).as_posix()
                out.append(open_tip(key, path.read_bytes(), recipient,
                                    self.edge.signing_key.public_key()))
        return out


def open_manifest(rig: Rig, blob: bytes) -> Manifest:
    recipient = load_recipient_private(rig.keys.cloud_dir / "recipient.key")
    header, payload = crypto.open_sealed(blob, recipient)
    signed = decompress(header.compression, payload, header.plaintext_len)
    return Manifest.from_json(crypto.verify_manifest(signed, rig.edge.signing_key.public_key()))


def make_rig(root: Path) -> Rig:
    keys = generate_keys(root / "keys", SITE)
    edge = load_edge_keys(keys.edge_dir / "recipient.pub", keys.edge_dir / "site.key",
                          keys.edge_dir / "dedup.key")
    store = Store(root / "state", DEFAULT_CLASSES)
    return Rig(root, keys, edge, store, Pipeline(SITE, edge, store, CHUNKING,
                                                 CompressionSettings()))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.store.close()


def problems(report: RestoreReport) -> str:
    return "\n".join(f"{p.what}: {p.reason}" for p in report.problems)


def day_folder(path: Path, days: int) -> Path:
    """The same manifest's path in the date folder `days` away from its own."""
    day = datetime.strptime("/".join(path.parts[-4:-1]), "%Y/%m/%d") + timedelta(days=days)
    return path.parents[3] / f"{day:%Y/%m/%d}" / path.name


# ---- acceptance 4: any one of 50 manifests deleted, hidden or replayed is reported ------------


@pytest.fixture(scope="module")
def fifty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, datetime]]:
    """50 manifests in two uploads; `since` falls between them (a tip before, one after).
    Shared by the trials: each undoes its damage."""
    rig = make_rig(tmp_path_factory.mktemp("fifty"))
    for i in range(25):
        rig.ingest(f"log/{i:02d}.txt", f"entry {i}\n".encode() * 50)
    asyncio.run(rig.upload())
    time.sleep(0.01)
    since = datetime.now(UTC)
    for i in range(25, 50):
        rig.ingest(f"log/{i:02d}.txt", f"entry {i}\n".encode() * 50)
    asyncio.run(rig.upload())
    assert sorted(rig.manifests()) == list(range(1, 51))
    tips = rig.tips()
    assert tips[-1].highest == 50 and not tips[-1].queued and not tips[-1].void
    assert not problems(rig.verify()), "the undamaged bucket verifies"
    yield rig, since
    rig.store.close()


def trial(rig: Rig, path: Path, damage: str, since: datetime | None) -> tuple[str, str]:
    """Damage one manifest, run verify (and verify --since), undo the damage; returns their
    problems."""
    aside = rig.root / "aside"
    other = day_folder(path, -1)  # an older date folder
    other.parent.mkdir(parents=True, exist_ok=True)
    {"delete": shutil.move, "hide": shutil.move, "replay": shutil.copy}[damage](
        path, aside if damage == "delete" else other)
    try:
        return problems(rig.verify()), problems(rig.verify(since)) if since else ""
    finally:
        if damage == "replay":
            other.unlink()
        else:
            shutil.move(aside if damage == "delete" else other, path)


@pytest.mark.parametrize("damage", ["delete", "hide", "replay"])
def test_any_one_of_50_manifests_damaged_is_reported_by_verify(
        fifty: tuple[Rig, datetime], damage: str) -> None:
    rig, since = fifty
    caught = 0
    for seq, path in sorted(rig.manifests().items()):
        # in the --since range (seq > 25), a hidden or deleted manifest shows as a gap
        full, recent = trial(rig, path, damage, since if seq > 25 and damage != "replay" else None)
        assert full, f"{damage} of manifest {seq}: verify reported nothing"
        if damage == "delete":
            assert f"manifest {seq} missing" in full, full
        else:
            assert "replayed or moved" in full, full
        if seq > 25 and damage != "replay":
            assert f"manifest {seq} missing" in recent, (seq, recent)
        caught += 1
    assert caught == 50
    assert not problems(rig.verify()), "every trial undid its damage"


# ---- the numbering survives restarts and crashes; void seqs are not gaps ---------------------


CRASH = """
import os, sys
from pathlib import Path
from agent.format import crypto
from agent.config.settings import DEFAULT_CLASSES
from agent.format.keys import load_edge_keys
from agent.errors import RestoreError
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest
from agent.config.settings import ChunkingSettings, CompressionSettings
from agent.store.store import Store
root, edge_dir = Path(sys.argv[1]), Path(sys.argv[2])
edge = load_edge_keys(edge_dir / "recipient.pub", edge_dir / "site.key",
                      edge_dir / "dedup.key")
store = Store(root / "state", DEFAULT_CLASSES)
pipe = Pipeline("camp-alpha", edge, store, ChunkingSettings(min_size=4096, avg_size=16384,
                max_size=65536), CompressionSettings())
store.commit_object = lambda staged: os._exit(9)  # the process dies before the commit
(root / "src").mkdir(exist_ok=True)
(root / "src" / "crash.txt").write_bytes(b"never committed")
pipe.ingest_file(IngestRequest(root / "src" / "crash.txt", "files", "crash.txt", "normal"))
"""


def test_seq_survives_reopen_and_a_crash_between_allocation_and_commit(rig: Rig) -> None:
    assert rig.ingest("a.txt", b"first").object_id
    rig.store.close()
    child = subprocess.run([sys.executable, "-c", CRASH, str(rig.root), str(rig.keys.edge_dir)],
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 9, child.stderr
    rig.reopen()  # start-up after the crash: seq 2 was allocated, never committed
    rig.ingest("b.txt", b"second")
    asyncio.run(rig.upload())
    assert sorted(rig.manifests()) == [1, 3]
    tip = rig.tips()[-1]
    assert (tip.highest, tip.void, tip.queued) == (3, ((2, 2),), ())
    assert not problems(rig.verify()), "a void seq is not a gap"


def test_an_abandoned_ingest_and_evicted_objects_are_void_not_gaps(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.reopen(quota=400 << 10)
    for i in range(3):  # bulk: evict-oldest; the third evicts the first, never uploaded
        rig.ingest(f"bulk-{i}.bin", os.urandom(150 << 10), priority="bulk")
    assert rig.store.summary(time.time())["bulk"].items.get("evicted") == 1

    def full(*_a: object) -> tuple[int, str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rig.pipeline, "_stage_manifest", full)
    with pytest.raises(Exception, match="full"):
        rig.ingest("late.txt", b"late")
    monkeypatch.undo()
    rig.ingest("last.txt", b"last")
    asyncio.run(rig.upload())
    assert sorted(rig.manifests()) == [2, 3, 5]
    assert rig.tips()[-1].void == ((1, 1), (4, 4))
    report = rig.verify()
    assert not problems(report) and report.objects_ok == 3


def test_version_1_manifests_still_verify_beside_numbered_ones(rig: Rig) -> None:
    rig.ingest("new.txt", b"numbered")
    rig.ingest("newer.txt", b"numbered too")
    asyncio.run(rig.upload())
    # An object of this site from before the upgrade: version 1, no seq, same chunks.
    m = open_manifest(rig, rig.manifests()[1].read_bytes())
    v1 = dataclasses.replace(m, version=1, stream="", seq=0, object_id=uuid7(),
                             name="legacy.txt")
    signed = crypto.sign_manifest(v1.to_json(), rig.edge.signing_key)
    assert b'"seq"' not in signed and b'"version":1' in signed
    key = layout.manifest_key(SITE, v1.created_at.timestamp(), v1.object_id)
    (rig.cloud / key).write_bytes(crypto.seal(
        signed, rig.edge.recipient_public, kind=crypto.KIND_MANIFEST,
        compression=crypto.COMPRESSION_NONE, plaintext_len=len(signed)))
    report = rig.verify()
    assert not problems(report) and report.objects_ok == 3
    out = rig.root / "out"
    assert asyncio.run(rig.restorer().run(out)).ok
    assert (out / SITE / "files" / "legacy.txt").read_bytes() == b"numbered"
    # Beside it, deleting the newest numbered manifest is reported.
    rig.manifests()[2].unlink()
    assert "manifest 2 missing" in problems(rig.verify())


# ---- restore: never an older version over a newer one -----------------------------------------


def test_restore_picks_by_seq_not_clock_and_refuses_a_replayed_old_manifest(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.ingest.pipeline as pipeline_mod

    today = datetime.now(UTC).replace(hour=6, minute=0, second=0, microsecond=0)
    monkeypatch.setattr(pipeline_mod, "now_iso", today.isoformat)
    rig.ingest("cfg.txt", b"version one")
    # The site's clock jumped back an hour: the newer version has the older `created`.
    monkeypatch.setattr(pipeline_mod, "now_iso", (today - timedelta(hours=1)).isoformat)
    (rig.root / "src" / "cfg.txt").write_bytes(b"version two, newer")
    os.utime(rig.root / "src" / "cfg.txt", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    rig.ingest("cfg.txt", b"version two, newer")
    asyncio.run(rig.upload())
    first = rig.manifests()[1]
    replay = day_folder(first, 1)  # the old manifest put back in a later folder
    replay.parent.mkdir(parents=True)
    shutil.copy(first, replay)
    out = rig.root / "out"
    report = asyncio.run(rig.restorer().run(out))
    assert (out / SITE / "files" / "cfg.txt").read_bytes() == b"version two, newer"
    assert "replayed or moved" in problems(report) and not report.ok


def test_a_second_restore_does_not_roll_back_a_file_after_the_newest_manifest_is_deleted(
        rig: Rig) -> None:
    rig.ingest("cfg.txt", b"version one")
    (rig.root / "src" / "cfg.txt").write_bytes(b"version two")
    os.utime(rig.root / "src" / "cfg.txt", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    rig.ingest("cfg.txt", b"version two")
    asyncio.run(rig.upload())
    out = rig.root / "out"
    assert asyncio.run(rig.restorer().run(out)).ok
    assert (out / SITE / "files" / "cfg.txt").read_bytes() == b"version two"
    rig.manifests()[2].unlink()
    report = asyncio.run(rig.restorer().run(out))
    assert (out / SITE / "files" / "cfg.txt").read_bytes() == b"version two"
    text = problems(report)
    assert "rollback" in text and "manifest 2 missing" in text and not report.ok
    assert (out / ".skyferry" / "restored.sqlite").is_file()


def test_the_restore_journal_is_not_written_through_a_link(rig: Rig) -> None:
    rig.ingest("a.txt", b"a")
    asyncio.run(rig.upload())
    out, elsewhere = rig.root / "out", rig.root / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / ".skyferry").symlink_to(elsewhere)
    with pytest.raises(RestoreError, match="symbolic link"):
        asyncio.run(rig.restorer().run(out))
    assert not any(elsewhere.iterdir())


def test_a_schema_1_store_is_migrated_and_numbers_from_1(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "index.sqlite")
    db.executescript(schema.SCHEMA)  # what schema 1 created; it has not changed
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.execute("INSERT INTO objects (id, source, class, rank, size, manifest_bytes, created, "
               "state, chunks_left) VALUES ('old', 'files', 'normal', 2, 1, 1, 0, 'committed', "
               "0)")
    db.commit()
    db.close()
    rig = make_rig(tmp_path)
    try:
        assert rig.store.get_meta("schema") == str(schema.SCHEMA_VERSION)
        rig.ingest("new.txt", b"after the upgrade")
        asyncio.run(rig.upload())
        assert sorted(rig.manifests()) == [1]
        assert not problems(rig.verify())
    finally:
        rig.store.close()


# ---- the tip object ---------------------------------------------------------------------------


def test_tips_are_create_only_numbered_and_say_nothing_new_only_once(rig: Rig) -> None:
    rig.ingest("a.txt", b"a")
    asyncio.run(rig.upload())  # at the window's opening (1 queued), after the ack (none)
    tips = rig.tips()
    assert [t.n for t in tips] == list(range(1, len(tips) + 1))
    assert (tips[-1].highest, tips[-1].queued) == (1, ())
    asyncio.run(rig.upload())  # a new window, nothing changed: no tip
    assert len(rig.tips()) == len(tips)
    keys = sorted(p.relative_to(rig.cloud).as_posix()
                  for p in (rig.cloud / SITE / "tips").rglob("*") if p.is_file())
    assert parse_tip_key(keys[0]) == (SITE, tips[0].stream, 1)
    rig.ingest("b.txt", b"b")
    asyncio.run(rig.upload())
    assert rig.tips()[-1].n > len(tips) and rig.tips()[-1].highest == 2
    # A tip cannot pass for a manifest (sealed kind, signature context) nor move.
    moved = rig.cloud / layout.manifest_key(SITE, time.time(), "x")
    moved.parent.mkdir(parents=True, exist_ok=True)
    tip_file = next(p for p in (rig.cloud / SITE / "tips").rglob("*") if p.is_file())
    shutil.copy(tip_file, moved.with_name(tips[0].stream))
    assert "holds" in problems(rig.verify())


def test_coarsen_keeps_a_backlog_of_many_runs_small_and_only_merges() -> None:
    runs = [(i * 3, i * 3 + 1) for i in range(1, 1001)]
    small = coarsen(runs, 100)
    assert len(small) <= 100
    covered = {q for a, b in small for q in range(a, b + 1)}
    assert all(q in covered for a, b in runs for q in range(a, b + 1))
    assert coarsen(runs[:5], 100) == tuple(runs[:5])


async def test_the_daemon_sends_a_tip_after_its_manifests(tmp_path: Path) -> None:
    from tests.kits.windows import JumpClock, RunningDaemon, site_settings, until

    settings = site_settings(tmp_path, {"mode": "always"}, site_id=SITE)
    cloud = tmp_path / "cloud"
    recipient = load_recipient_private(tmp_path / "keys" / "cloud" / "recipient.key")
    site_key = load_verify_key(tmp_path / "keys" / "cloud" / "sites" / f"{SITE}.pub")

    def newest_tip() -> Tip | None:
        files = sorted(p for p in (cloud / SITE / "tips").rglob("*") if p.is_file())
        if not files:
            return None
        key = files[-1].relative_to(cloud).as_posix()
        return open_tip(key, files[-1].read_bytes(), recipient, site_key)

    async with RunningDaemon(settings, JumpClock(time.time())) as run:
        await run.ingest(tmp_path, count=3, size=10_000)
        await until(lambda: (tip := newest_tip()) is not None and tip.highest == 3
                    and not tip.queued, 20, "a tip saying 3 manifests, none queued")
    assert len([p for p in (cloud / SITE / "manifests").rglob("*") if p.is_file()]) == 3
