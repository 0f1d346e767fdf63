"""A hostile producer races the spool (issue 13, acceptance 2): files, sub-folders and done/
are swapped for symbolic links (to files and folders outside the spool, to the state_dir and
the keys) at random instants while over a thousand files are ingested, with after = "delete"
and after = "move". Nothing outside the spool may be read, written or deleted.

Checked by content, inode and atime of everything outside (atime is set in the past first:
with relatime any read moves it), and by opening every chunk the store holds: no byte from
outside the spool is in it, and every file stored is a version its producer wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config.settings import (
    DEFAULT_CLASSES,
    ChunkingSettings,
    CompressionSettings,
    SpoolSettings,
)
from agent.format import crypto
from agent.format.codec import decompress
from agent.format.keys import generate_keys, load_edge_keys, load_recipient_private, load_verify_key
from agent.format.manifest import KIND_FILE_PACK, Manifest
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest, IngestResult, PackResult
from agent.obs.metrics import Metrics
from agent.sources.spool import SpoolSource
from agent.store.store import Store

SITE = "race-site"
CHUNKING = ChunkingSettings(min_size=4 << 10, avg_size=16 << 10, max_size=64 << 10,
                            pack_below=6 << 10, pack_files=64)
OUTSIDE = b"OUTSIDE-THE-SPOOL "
FOLDERS = ("d0", "d1", "d2")
OLD_ATIME = 1_500_000_000


class Outside:
    """Files and folders outside the spool, and how they must stay."""

    def __init__(self, root: Path, protected: list[Path]) -> None:
        self.root = root
        for folder in ("", *FOLDERS):
            (root / folder).mkdir(parents=True, exist_ok=True)
            for i in range(20):  # the names the producer uses too
                (root / folder / f"f{i}.txt").write_bytes(OUTSIDE + f"{folder}/{i}".encode())
        self.watched = sorted(p for p in root.rglob("*") if p.is_file()) + protected
        for p in self.watched:
            os.utime(p, (OLD_ATIME, p.stat().st_mtime))
        self.before = self.snapshot()
        self.before_listing = self.listing()

    def snapshot(self) -> dict[str, tuple[int, int, float, bytes]]:
        out = {}
        for p in self.watched:
            st = p.stat()
            out[str(p)] = (st.st_ino, st.st_size, st.st_atime, p.read_bytes())
        for p in self.watched:  # reading it just now moved atime: put it back
            os.utime(p, (OLD_ATIME, p.stat().st_mtime))
        return out

    def listing(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*"))


class Producer(threading.Thread):
    """Writes files the well-behaved way (temporary name, then rename) into the spool."""

    def __init__(self, spool: Path, count: int, locks: dict[str, threading.Lock]) -> None:
        super().__init__(daemon=True)
        self.spool, self.count, self.locks = spool, count, locks
        self.written: dict[str, set[bytes]] = {}
        self.rng = random.Random(1)

    def run(self) -> None:
        for i in range(self.count):
            folder = self.rng.choice(("", *FOLDERS))
            name = f"{folder}/f{i}.txt" if folder else f"f{i}.txt"
            size = self.rng.choice((100, 900, 3000, 9000, 40000))
            data = f"PRODUCER {name} ".encode() + self.rng.randbytes(size)
            with self.locks.get(folder, threading.Lock()):
                tmp = self.spool / (folder or ".") / f".{i}.tmp"
                tmp.write_bytes(data)
                os.rename(tmp, self.spool / name)
            self.written.setdefault(name, set()).add(data)
            if i % 2 == 0:
                time.sleep(0.003)


class Racer(threading.Thread):
    """Swaps spool files, sub-folders and done/ for symbolic links, at random instants."""

    def __init__(self, spool: Path, targets: list[Path], folder_targets: list[Path],
                 locks: dict[str, threading.Lock], move: bool) -> None:
        super().__init__(daemon=True)
        self.spool, self.targets, self.folder_targets = spool, targets, folder_targets
        self.locks, self.move = locks, move
        self.stop = threading.Event()
        self.swaps = 0
        self.error: BaseException | None = None
        self.rng = random.Random(2)

    def run(self) -> None:
        kinds = [self.swap_file, self.swap_folder] + ([self.swap_done] if self.move else [])
        try:
            while not self.stop.is_set():
                self.rng.choice(kinds)()
                time.sleep(self.rng.random() * 0.002)
        except BaseException as e:
            self.error = e
            raise

    def hold(self) -> None:
        time.sleep(self.rng.random() * 0.004)

    def swap_file(self) -> None:
        folder = self.spool / self.rng.choice(("", *FOLDERS))
        try:
            names = [n for n in os.listdir(folder) if n.startswith("f")]
        except OSError:
            return
        if not names:
            return
        path = folder / self.rng.choice(names)
        aside = folder / f".aside-{path.name}"
        try:
            os.rename(path, aside)
        except OSError:
            return
        os.symlink(self.rng.choice(self.targets), path)
        self.swaps += 1
        self.hold()
        os.unlink(path)
        os.rename(aside, path)

    def swap_folder(self) -> None:
        name = self.rng.choice(FOLDERS)
        with self.locks[name]:
            path, aside = self.spool / name, self.spool / f".aside-{name}"
            os.rename(path, aside)
            os.symlink(self.rng.choice(self.folder_targets), path)
            self.swaps += 1
            self.hold()
            os.unlink(path)
            os.rename(aside, path)

    def swap_done(self) -> None:
        done, aside = self.spool / "done", self.spool / ".aside-done"
        try:
            os.rename(done, aside)
        except OSError:
            return
        try:
            os.symlink(self.rng.choice(self.folder_targets), done)
            self.swaps += 1
            self.hold()
            os.unlink(done)
        except OSError:
            pass  # the daemon made a new done/ in between: merged below
        while True:
            try:
                os.rename(aside, done)
                return
            except OSError:  # the daemon made done/ again and moved files into it
                for p in sorted(done.rglob("*")):
                    if p.is_file():
                        (aside / p.relative_to(done)).parent.mkdir(parents=True, exist_ok=True)
                        os.rename(p, aside / p.relative_to(done))
                for d in sorted((p for p in done.rglob("*") if p.is_dir()), reverse=True):
                    with contextlib.suppress(OSError):  # never a file removed: only empty dirs
                        d.rmdir()
                with contextlib.suppress(OSError):
                    done.rmdir()


def open_blob(path: Path, recipient: Any) -> bytes:
    header, payload = crypto.open_sealed(path.read_bytes(), recipient)
    return decompress(header.compression, payload, header.plaintext_len)


def stored_files(store: Store, recipient: Any, verify: Any) -> dict[str, list[bytes]]:
    """name -> contents of every file the store holds (opened as restore opens them)."""
    chunks: dict[str, bytes] = {}
    for p in store.chunks_dir.rglob("*"):
        if p.is_file():
            chunks[p.name] = open_blob(p, recipient)
    out: dict[str, list[bytes]] = {}
    for p in store.manifests_dir.iterdir():
        m = Manifest.from_json(crypto.verify_manifest(open_blob(p, recipient), verify))
        data = b"".join(chunks[r.id] for r in m.chunks)
        if m.kind == KIND_FILE_PACK:
            for e in m.entries:
                out.setdefault(e.name, []).append(data[e.offset:e.offset + e.size])
        else:
            out.setdefault(m.name, []).append(data)
    return out


def skipped(metrics: Metrics) -> dict[str, float]:
    """The spool's skip counts by reason."""
    return {labels["reason"]: value for m in metrics.spool_skipped.collect()
            for sample in m.samples if sample.name.endswith("_total")
            for labels, value in [(sample.labels, sample.value)]}


async def drive(source: SpoolSource, producer: Producer, racer: Racer, spool: Path,
                metrics: Metrics) -> None:
    producer.start()
    racer.start()
    deadline = time.monotonic() + 40
    # Until every file is written, the racer has swapped often enough and a scan has caught a
    # link in place of a file (a loaded machine slows the racer's sleeps and thins the scans),
    # whichever comes last.
    while ((producer.is_alive() or racer.swaps < 300 or not skipped(metrics).get("symlink"))
           and racer.is_alive() and time.monotonic() < deadline):
        await source.scan_once()
    racer.stop.set()
    racer.join(10)
    for _ in range(200):  # drain, the racer stopped
        await source.scan_once()
        if not any(p.is_file() for p in spool.rglob("f*") if "done" not in p.parts):
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("after", ["delete", "move"])
def test_symlink_races_never_reach_outside_the_spool(tmp_path: Path, after: str) -> None:
    gen = generate_keys(tmp_path / "keys", SITE)
    e = gen.edge_dir
    keys = load_edge_keys(e / "recipient.pub", e / "site.key", e / "dedup.key")
    recipient = load_recipient_private(gen.cloud_dir / "recipient.key")
    verify = load_verify_key(gen.cloud_dir / "sites" / f"{SITE}.pub")
    state = tmp_path / "state"
    store = Store(state, DEFAULT_CLASSES)
    pipeline = Pipeline(SITE, keys, store, CHUNKING, CompressionSettings(level=1))
    index = state / "index.sqlite"
    key_files = [e / "site.key", e / "dedup.key"]
    outside = Outside(tmp_path / "outside", key_files)
    index_ino = index.stat().st_ino

    spool = tmp_path / "spool"
    for folder in FOLDERS:
        (spool / folder).mkdir(parents=True)
    settings = SpoolSettings(name="race", path=spool, settle_s=0.0,
                             after="move" if after == "move" else "delete", scan_interval_s=0.01)
    accepted: list[str] = []

    async def ingest(req: IngestRequest) -> IngestResult:
        r = await asyncio.to_thread(pipeline.ingest_file, req)
        accepted.append(req.name)
        return r

    async def ingest_pack(reqs: list[IngestRequest]) -> PackResult:
        r = await asyncio.to_thread(pipeline.ingest_pack, reqs)
        accepted.extend(r.accepted)
        return r

    metrics = Metrics()
    source = SpoolSource(settings, ingest, ingest_pack, CHUNKING, workers=2,
                         protected=(*key_files, e), metrics=metrics, state_dir=state)
    locks = {f: threading.Lock() for f in FOLDERS}
    producer = Producer(spool, 1200, locks)
    targets = [*sorted((outside.root).glob("f*.txt")), index, *key_files]
    racer = Racer(spool, targets, [outside.root / "d1", outside.root, state, e], locks,
                  after == "move")
    try:
        asyncio.run(drive(source, producer, racer, spool, metrics))
    finally:
        racer.stop.set()
        store_files = stored_files(store, recipient, verify)
        store.close()
    assert len(set(accepted)) >= 1000, len(accepted)  # 1,200 written: over 1,000 in each run

    check(after, racer, metrics, outside, index, index_ino, state, spool, producer,
          store_files)


def check(after: str, racer: Racer, metrics: Metrics, outside: Outside, index: Path,
          index_ino: int, state: Path, spool: Path, producer: Producer,
          store_files: dict[str, list[bytes]]) -> None:
    assert racer.error is None, repr(racer.error)
    assert racer.swaps > 200, racer.swaps
    hits = skipped(metrics)
    # The races did reach the daemon: links seen by the scan, files swapped between the scan
    # and the open, folders swapped before a delete or move.
    assert hits.get("symlink", 0) >= 1 and sum(hits.values()) >= 50, hits
    # Nothing outside read (atime), written or deleted (content, inode, listing).
    assert outside.snapshot() == outside.before
    assert outside.listing() == outside.before_listing
    assert index.stat().st_ino == index_ino
    assert not [p for p in state.rglob("f*.txt")], "a spool file was written into state_dir"
    # Every stored file is a version its producer wrote under that name; nothing else.
    for name, versions in store_files.items():
        for data in versions:
            assert OUTSIDE not in data and b"SQLite format 3" not in data, name
            assert data in producer.written.get(name, set()), name
    # Nothing lost: every file written was stored, and it left the spool (or moved to done/).
    assert set(producer.written) <= set(store_files)
    left = {p.relative_to(spool).as_posix() for p in spool.rglob("*") if p.is_file()}
    if after == "move":
        assert {n.removeprefix("done/") for n in left} == set(producer.written)
        assert all(n.startswith("done/") for n in left), sorted(left)[:5]
    else:
        assert left == set(), sorted(left)[:5]
