"""agent.ingest (pipeline, cutting, compressor, sealing): chunking, compression, sealing and
signing, with a real store and real keys."""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from pyfastcdc import FastCDC

from agent.config.settings import ChunkingSettings, CompressionSettings
from agent.errors import DiskFullError, SourceError, SourceUnsettledError
from agent.format import crypto
from agent.format.codec import decompress
from agent.ingest import sealing
from agent.ingest.compressor import Compressor
from agent.ingest.requests import IngestRequest
from agent.store.store import ManifestWork
from tests.kits.pipeline import Env, Keys, pipeline_env, site_keys

SITE = "pipe-site"
# Small chunks keep the files small; the buffer the pipeline cuts over is 2 * max_size.
CHUNKING = ChunkingSettings(min_size=4 << 10, avg_size=16 << 10, max_size=64 << 10)
SEAL_OVERHEAD = crypto.HEADER_SIZE + crypto.TAG_SIZE


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return site_keys(tmp_path_factory.mktemp("keys"), SITE)


@pytest.fixture
def env(tmp_path: Path, keys: Keys) -> Iterator[Env]:
    with pipeline_env(tmp_path, SITE, keys, CHUNKING) as e:
        yield e


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def text_data(n: int) -> bytes:
    rows = (f"{i},sensor-{i % 7},{20 + i % 13}.{i % 10},ok\n".encode() for i in range(n))
    return b"".join(rows)


def expected_cuts(data: bytes) -> list[int]:
    """Chunk lengths of one FastCDC pass over the whole object, as the design specifies."""
    c = CHUNKING
    cutter = FastCDC(c.avg_size - c.min_size, min_size=c.min_size, max_size=c.max_size)
    return [piece.length for piece in cutter.cut_buf(data)]


def test_random_data_is_not_compressed(env: Env) -> None:
    data = random.Random(1).randbytes(300_000)
    res = env.ingest("noise.bin", data)
    m = env.manifest(res.object_id)
    assert len(m.chunks) > 3
    for ref in m.chunks:
        blob = env.store.chunk_path(ref.id).read_bytes()
        assert crypto.parse_header(blob).compression == crypto.COMPRESSION_NONE
        assert len(blob) == ref.length + SEAL_OVERHEAD
    assert env.restore(res.object_id) == data


def test_text_is_compressed(env: Env) -> None:
    data = text_data(10_000)
    res = env.ingest("table.csv", data)
    m = env.manifest(res.object_id)
    sealed = 0
    for ref in m.chunks:
        blob = env.store.chunk_path(ref.id).read_bytes()
        assert crypto.parse_header(blob).compression == crypto.COMPRESSION_ZSTD
        sealed += len(blob)
    assert sealed < len(data) / 3
    assert res.stored_bytes == sealed + env.store.manifest_path(res.object_id).stat().st_size
    assert env.restore(res.object_id) == data


def test_compressor_judges_the_whole_chunk_at_level_1() -> None:
    comp = Compressor(CompressionSettings())
    noise = random.Random(2).randbytes(100_000)
    assert comp.compress(noise) == (crypto.COMPRESSION_NONE, noise)
    text = text_data(2000)
    kind, packed = comp.compress(memoryview(text))
    assert kind == crypto.COMPRESSION_ZSTD and len(packed) < len(text) / 3
    assert decompress(kind, packed, len(text)) == text
    # A pack's chunk may start with an incompressible file and go on with text: a sample of
    # its start would have kept it all raw; the whole compresses.
    mixed = noise + text * (400_000 // len(text) + 1)
    kind, packed = comp.compress(mixed)
    assert kind == crypto.COMPRESSION_ZSTD and len(packed) < 0.5 * len(mixed)
    assert decompress(kind, packed, len(mixed)) == mixed
    # Shrinks, but not to min_ratio (0.95) of its size: stored as is.
    barely = noise + text[:3000]
    assert comp.compress(barely) == (crypto.COMPRESSION_NONE, barely)
    # zstd cannot shrink something this short: stored as is.
    assert comp.compress(b"xy") == (crypto.COMPRESSION_NONE, b"xy")


def test_zero_byte_file(env: Env) -> None:
    res = env.ingest("empty.txt", b"")
    assert (res.size, res.chunks, res.new_chunks) == (0, 0, 0)
    m = env.manifest(res.object_id)
    assert m.size == 0 and m.chunks == () and m.hash == blake3.blake3(b"").hexdigest()
    assert res.stored_bytes == env.store.manifest_path(res.object_id).stat().st_size
    assert files_under(env.store.chunks_dir) == []
    work = env.store.next_work(0.0, 3600)  # nothing to send but the manifest
    assert isinstance(work, ManifestWork) and work.object_id == res.object_id


def grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"one more line\n")


def shrink(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def rewrite_same_size(path: Path) -> None:
    st = path.stat()
    path.write_bytes(bytes(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("change", [grow, shrink, rewrite_same_size])
def test_file_changing_while_read_is_refused_and_leaves_nothing(
        env: Env, monkeypatch: pytest.MonkeyPatch, change: Callable[[Path], None]) -> None:
    data = random.Random(3).randbytes(400_000)
    path = env.write("growing.bin", data)
    real_stat = os.stat
    changed: list[bool] = []

    def stat_then_change(p: Any, *args: Any, **kw: Any) -> os.stat_result:
        # The producer writes again right after the pipeline took its first look.
        st = real_stat(p, *args, **kw)
        if os.fspath(p) == str(path) and not changed:
            changed.append(True)
            change(path)
        return st

    monkeypatch.setattr(os, "stat", stat_then_change)
    with pytest.raises(SourceError, match=r"changed (before|while) it (could be|was being) read"
                       ) as refused:
        env.pipeline.ingest_file(IngestRequest(path, "files", "growing.bin", "normal"))
    monkeypatch.undo()
    # Said to a `skyferry put` user too: nothing promises an ingest that will not happen.
    assert "not stored" in str(refused.value) and "put" in str(refused.value), refused.value
    assert changed
    assert list(env.store.staging_dir.iterdir()) == []
    assert files_under(env.store.chunks_dir) == []
    assert files_under(env.store.manifests_dir) == []
    assert env.store.pending_objects() == 0 and env.store.used_bytes == 0
    assert env.store.chunk_counts() == {}

    # Once it stops changing it goes in, and the failed attempt left no reservation behind.
    res = env.ingest("growing.bin")
    assert env.restore(res.object_id) == path.read_bytes()


def test_a_pack_member_written_between_look_and_open_is_unsettled_and_the_rest_sealed(
        env: Env) -> None:
    """The producer appends after the pack was planned, before its file is opened: nothing of
    it was read, so it is refused as unsettled (a spool looks again once it settles, without a
    line), named once in its message; the other files are sealed."""
    names = ("a.txt", "b.txt", "c.txt", "d.txt")
    paths = {n: env.write(n, f"{n} content\n".encode() * 20) for n in names}

    def append_then_open() -> int:
        with open(paths["b.txt"], "ab") as f:
            f.write(b"appended\n")
        return os.open(paths["b.txt"], os.O_RDONLY)

    def open_then_delete() -> int:  # deleted by its producer: it went away, not unsettled
        fd = os.open(paths["d.txt"], os.O_RDONLY)
        paths["d.txt"].unlink()
        return fd

    openers = {"b.txt": append_then_open, "d.txt": open_then_delete}
    reqs = [IngestRequest(p, "files", n, "normal", seen=os.stat(p), opener=openers.get(n))
            for n, p in paths.items()]
    result = env.pipeline.ingest_pack(reqs)
    assert set(result.accepted) == {"a.txt", "c.txt"}
    assert set(result.failed) == {"b.txt", "d.txt"}
    refused = result.failed["b.txt"]
    assert isinstance(refused, SourceUnsettledError), refused
    assert str(refused).count(str(paths["b.txt"])) == 1, refused
    assert str(refused).count("not stored") == 1, refused
    gone = result.failed["d.txt"]
    assert isinstance(gone, SourceError) and not isinstance(gone, SourceUnsettledError), gone
    assert result.object_id is not None


def test_missing_or_special_file_is_a_source_error(env: Env) -> None:
    with pytest.raises(SourceError, match="disappeared"):
        env.ingest("never-written.bin")
    (env.src / "folder").mkdir(parents=True)
    with pytest.raises(SourceError, match="not a regular file"):
        env.ingest("folder")
    assert list(env.store.staging_dir.iterdir()) == []
    assert env.store.pending_objects() == 0


@pytest.mark.parametrize("size", [
    1, CHUNKING.min_size, CHUNKING.min_size + 1, CHUNKING.max_size, 2 * CHUNKING.max_size - 1,
    2 * CHUNKING.max_size, 2 * CHUNKING.max_size + 1, 5 * CHUNKING.max_size + 12_345,
])
def test_cut_points_are_those_of_one_pass_over_the_object(env: Env, size: int) -> None:
    """Refilling the read buffer must not move a cut point."""
    data = random.Random(size).randbytes(size)
    res = env.ingest("obj.bin", data)
    m = env.manifest(res.object_id)
    assert [r.length for r in m.chunks] == expected_cuts(data)
    assert env.restore(res.object_id) == data


def test_chunks_are_content_defined(env: Env) -> None:
    data = random.Random(4).randbytes(1 << 20)
    first = env.ingest("v1.bin", data)
    ids1 = [r.id for r in env.manifest(first.object_id).chunks]
    lengths = [r.length for r in env.manifest(first.object_id).chunks]
    assert len(set(lengths)) > len(lengths) // 2  # sizes follow content, not a fixed grid
    assert all(CHUNKING.min_size <= n <= CHUNKING.max_size for n in lengths[:-1])

    second = env.ingest("v2.bin", b"inserted at the front " * 5 + data)
    ids2 = [r.id for r in env.manifest(second.object_id).chunks]
    shared = set(ids1) & set(ids2)
    assert len(shared) >= len(ids1) - 2, (len(shared), len(ids1))
    assert second.new_chunks <= 2
    assert second.chunks - second.new_chunks == len([i for i in ids2 if i in shared])
    assert env.restore(second.object_id)[110:] == data


def test_repeated_content_inside_one_object_is_stored_once(env: Env) -> None:
    block = random.Random(5).randbytes(200_000)
    data = block * 3
    res = env.ingest("triple.bin", data)
    ids = [r.id for r in env.manifest(res.object_id).chunks]
    assert len(set(ids)) < len(ids)
    assert res.new_chunks == len(set(ids))
    assert len(files_under(env.store.chunks_dir)) == len(set(ids))
    assert env.restore(res.object_id) == data


def test_manifest_is_signed_and_describes_the_object(env: Env) -> None:
    data = text_data(3000) + random.Random(6).randbytes(150_000)
    path = env.write("sub/dir/obs.dat", data)
    res = env.ingest("sub/dir/obs.dat", priority="high", instrument="cam-2")
    m = env.manifest(res.object_id)
    st = path.stat()
    assert m.object_id == res.object_id and m.site == SITE and m.source == "files"
    assert m.name == "sub/dir/obs.dat" and m.kind == "file" and m.priority == "high"
    assert m.size == len(data) == res.size and m.mtime_ns == st.st_mtime_ns
    assert m.meta == {"instrument": "cam-2"}
    assert m.hash == blake3.blake3(data).hexdigest()
    assert len(m.chunks) == res.chunks == res.new_chunks
    # The refs tile the file: contiguous offsets from 0, lengths summing to its size.
    assert m.chunks[0].offset == 0
    for a, b in zip(m.chunks, m.chunks[1:], strict=False):
        assert b.offset == a.offset + a.length
    assert sum(r.length for r in m.chunks) == len(data)
    for ref in m.chunks:
        assert data[ref.offset:ref.offset + ref.length] == env.chunk(ref)
    assert m.created_at.tzinfo is not None
    # The whole sealed manifest fails to verify once one byte of the signed body changes.
    blob = env.store.manifest_path(res.object_id).read_bytes()
    header, payload = crypto.open_sealed(blob, env.keys.recipient)
    signed = bytearray(decompress(header.compression, payload, header.plaintext_len))
    signed[-3] ^= 0x01
    with pytest.raises(crypto.CryptoError):
        crypto.verify_manifest(bytes(signed), env.keys.verify)


def _writers(env: Env, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of the thread that writes each chunk."""
    names: list[str] = []
    write = env.pipeline._write_chunk

    def recorded(*args: Any) -> Any:
        names.append(threading.current_thread().name)
        return write(*args)

    monkeypatch.setattr(env.pipeline, "_write_chunk", recorded)
    return names


def test_a_lone_object_is_sealed_by_two_threads_and_restores(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealing, "_CPUS", 2)  # a CPU to spare, on any machine
    writers = _writers(env, monkeypatch)
    data = random.Random(3).randbytes(1 << 20) + text_data(40_000)
    r = env.ingest("lone.bin", data)
    assert r.new_chunks == len(writers) > 8
    helpers = [n for n in writers if n.startswith("skyferry-seal")]
    assert 0 < len(helpers) < len(writers), writers  # both threads wrote chunks
    assert env.restore(r.object_id) == data
    assert sorted(p.name for p in (env.store.state_dir / "staging").iterdir()) == []


def test_no_second_thread_without_a_spare_cpu(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealing, "_CPUS", 1)
    writers = _writers(env, monkeypatch)
    data = random.Random(4).randbytes(1 << 20)
    r = env.ingest("alone.bin", data)
    assert len(writers) == r.new_chunks > 8
    assert not [n for n in writers if n.startswith("skyferry-seal")]
    assert env.restore(r.object_id) == data


def test_no_second_thread_at_high_levels(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its zstd context would cost ~50-80 MiB more at level 19."""
    monkeypatch.setattr(sealing, "_CPUS", 2)
    env.pipeline.compressor.set_level(sealing.SECOND_THREAD_MAX_LEVEL + 1)
    writers = _writers(env, monkeypatch)
    data = text_data(60_000)
    r = env.ingest("text.csv", data)
    assert len(writers) == r.new_chunks > 8
    assert not [n for n in writers if n.startswith("skyferry-seal")]
    assert env.restore(r.object_id) == data


def test_a_failure_in_the_second_thread_abandons_the_object(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealing, "_CPUS", 2)
    write = env.pipeline._write_chunk

    def full_in_helper(*args: Any) -> Any:
        if threading.current_thread().name.startswith("skyferry-seal"):
            raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
        return write(*args)

    monkeypatch.setattr(env.pipeline, "_write_chunk", full_in_helper)
    src = env.write("big.bin", random.Random(5).randbytes(1 << 20))
    with pytest.raises(DiskFullError, match="is full"):
        env.ingest("big.bin")
    assert src.exists()  # the data stays at its source
    assert list((env.store.state_dir / "staging").iterdir()) == []
    assert env.store.pending_objects() == 0
