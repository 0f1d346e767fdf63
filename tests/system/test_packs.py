"""File packs: small files sealed together, restored and verified file by file."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.backends.registry import open_backend
from agent.cloud.restore import Restorer, site_key_loader
from agent.cloud.restore_read import RestoreReport
from agent.config.settings import DEFAULT_CLASSES, ChunkingSettings, CompressionSettings
from agent.format import layout
from agent.format.keys import generate_keys, load_edge_keys, load_recipient_private, load_verify_key
from agent.format.manifest import KIND_FILE_PACK, Manifest
from agent.ingest.packing import MemberChanged, PackReader
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest, PackResult
from agent.sources.spool_scan import Candidate, plan
from agent.store.store import ManifestWork, Store
from tests.kits.pipeline import Env as PipeEnv  # its way of opening a manifest
from tests.kits.pipeline import Keys
from tests.kits.site import tree_digest

SITE = "pack-site"
NO_AGING = 1e9


@dataclass
class Env:
    root: Path
    pipeline: Pipeline
    store: Store
    recipient: X25519PrivateKey
    cloud_keys: Path
    src: Path

    def files(self, n: int, seed: int = 1) -> list[IngestRequest]:
        rng = random.Random(seed)
        reqs = []
        for i in range(n):
            name = f"d{i % 7}/ünï-{i:04d}.jsonl" if i % 3 else f"f{i:04d}.bin"
            size = 0 if i == 5 else rng.randrange(1, 48 << 10)
            data = (b'{"t":%d,"v":"' % i + rng.randbytes(size // 4).hex().encode())[:size]
            p = self.src / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            os.utime(p, ns=(1_700_000_000_000_000_000 + i, 1_700_000_000_000_000_000 + i * 7))
            reqs.append(IngestRequest(p, "files", name, "normal"))
        return reqs

    def upload_all(self) -> Path:
        """What the uplink does, into a local-folder cloud: chunks, then manifests."""
        cloud = self.root / "cloud"
        cloud.mkdir(exist_ok=True)
        backend = open_backend(f"file://{cloud}")

        async def push() -> None:
            while (work := self.store.next_work(time.time(), NO_AGING)) is not None:
                if isinstance(work, ManifestWork):
                    await backend.put_if_absent(
                        layout.manifest_key(SITE, work.created, work.object_id),
                        work.path.read_bytes())
                    self.store.mark_committed(work.object_id)
                else:
                    await backend.put_if_absent(layout.chunk_key(SITE, work.chunk_id),
                                                work.path.read_bytes())
                    self.store.mark_chunk_uploaded(work.chunk_id)

        asyncio.run(push())
        return cloud

    def restore(self, cloud: Path, target: Path | None) -> RestoreReport:
        r = Restorer(open_backend(f"file://{cloud}"), self.recipient,
                     site_key_loader(self.cloud_keys))
        return asyncio.run(r.run(target, show_progress=False))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    gen = generate_keys(tmp_path / "keys", SITE)
    edge = load_edge_keys(gen.edge_dir / "recipient.pub", gen.edge_dir / "site.key",
                          gen.edge_dir / "dedup.key")
    store = Store(tmp_path / "state", DEFAULT_CLASSES)
    chunking = ChunkingSettings(pack_avg_size=128 << 10)
    e = Env(tmp_path, Pipeline(SITE, edge, store, chunking, CompressionSettings()), store,
            load_recipient_private(gen.cloud_dir / "recipient.key"), gen.cloud_dir,
            tmp_path / "src")
    yield e
    store.close()


def _manifests(env: Env) -> list[Manifest]:
    keys = Keys(env.pipeline.keys, env.recipient,
                load_verify_key(env.cloud_keys / "sites" / f"{SITE}.pub"))
    pe = PipeEnv(env.store, env.pipeline, keys, env.src)
    return [pe.manifest(p.name) for p in env.store.manifests_dir.iterdir()
            if not p.name.startswith(".")]


def test_pack_restores_every_file_byte_identical_with_mtime(env: Env, tmp_path: Path) -> None:
    reqs = env.files(600)
    result = env.pipeline.ingest_pack(reqs)
    assert result.object_id is not None and not result.failed
    assert set(result.accepted) == {r.name for r in reqs}
    (m,) = _manifests(env)
    assert m.kind == KIND_FILE_PACK and len(m.entries) == 600
    assert [e.name for e in m.entries] == sorted(r.name for r in reqs)
    # Chunks are cut across file boundaries: far fewer chunks than files.
    assert 1 < len(m.chunks) < 100

    cloud = env.upload_all()
    out = tmp_path / "out"
    report = env.restore(cloud, out)
    assert report.ok, report.problems
    assert report.objects_ok == 600 and report.bytes_ok == result.size
    assert tree_digest(out / SITE / "files") == tree_digest(env.src)
    for r in reqs:
        assert (out / SITE / "files" / r.name).stat().st_mtime_ns == r.path.stat().st_mtime_ns
    verified = env.restore(cloud, None)
    assert verified.ok and verified.objects_ok == 600


def test_offering_the_same_files_again_seals_nothing(env: Env) -> None:
    reqs = env.files(50)
    first = env.pipeline.ingest_pack(reqs)
    again = env.pipeline.ingest_pack(reqs)
    assert again.object_id is None and not again.failed
    assert {r.duplicate_of for r in again.accepted.values()} == {first.object_id}
    assert len(_manifests(env)) == 1
    # One file changes: only it is sealed again, alone in a new pack.
    reqs[3].path.write_bytes(b"changed")
    third = env.pipeline.ingest_pack(reqs)
    assert third.object_id not in (None, first.object_id)
    fresh = [n for n, r in third.accepted.items() if r.duplicate_of is None]
    assert fresh == [reqs[3].name]


def test_bad_members_are_left_out_and_named(env: Env) -> None:
    reqs = env.files(20)
    gone = IngestRequest(env.src / "missing.txt", "files", "missing.txt", "normal")
    (env.src / "sub").mkdir()
    folder = IngestRequest(env.src / "sub", "files", "sub", "normal")
    unsafe = IngestRequest(reqs[0].path, "files", "../escape.txt", "normal")
    result = env.pipeline.ingest_pack([*reqs, gone, folder, unsafe])
    assert set(result.failed) == {"missing.txt", "sub", "../escape.txt"}
    assert "disappeared" in str(result.failed["missing.txt"])
    assert "not a regular file" in str(result.failed["sub"])
    assert "never be restored" in str(result.failed["../escape.txt"])
    assert set(result.accepted) == {r.name for r in reqs}


def test_pack_reader_notices_a_file_that_changed_after_planning(env: Env) -> None:
    reqs = env.files(3)
    members = [(r, os.stat(r.path)) for r in reqs]
    reqs[1].path.write_bytes(reqs[1].path.read_bytes() + b"more")
    reader = PackReader(members)
    buf = memoryview(bytearray(1 << 20))
    with pytest.raises(MemberChanged) as info:
        while reader.readinto(buf):
            pass
    assert info.value.index == 1
    reader.close()


def test_an_edit_in_one_small_file_resends_little(env: Env, tmp_path: Path) -> None:
    reqs = env.files(800, seed=4)
    first = env.pipeline.ingest_pack(reqs)
    assert first.object_id is not None
    victim = reqs[400].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # The edited tree arrives again under another source (a copy): dedup by content only.
    copies = [IngestRequest(r.path, "copy", r.name, "normal") for r in reqs]
    second = env.pipeline.ingest_pack(copies)
    assert second.new_chunks <= 3, (second.new_chunks, second.chunks)
    assert second.stored_bytes < 0.05 * first.stored_bytes


def _cand(name: str, size: int) -> Candidate:
    return Candidate(Path("/spool") / name, name, size, 0)


def test_plan_packs_small_files_and_keeps_large_ones_alone() -> None:
    c = ChunkingSettings(pack_below=1000, pack_size=2500, pack_files=3)
    ready = [_cand("a", 10), _cand("big", 5000), _cand("b", 900), _cand("c", 900),
             _cand("d", 900), _cand("e", 1), _cand("f", 1), _cand("g", 1), _cand("h", 1)]
    batches = plan(ready, c)
    assert [[x.name for x in b] for b in batches] == [
        ["a", "b", "c"], ["big"], ["d", "e", "f"], ["g", "h"]]
    assert [[x.name for x in b] for b in plan(ready, None)] == [[x.name] for x in ready]
    off = ChunkingSettings(pack_below=0)
    assert all(len(b) == 1 for b in plan(ready, off))


def test_pack_result_counts(env: Env) -> None:
    result: PackResult = env.pipeline.ingest_pack(env.files(30))
    assert result.size == sum(r.size for r in result.accepted.values())
    assert result.chunks >= result.new_chunks >= 1
    assert result.stored_bytes == sum(
        p.stat().st_size for d in (env.store.chunks_dir, env.store.manifests_dir)
        for p in d.rglob("*") if p.is_file())
