"""Issue 6, acceptance 4 (disk-full trial): clear refusal, no corruption, resumes after space
returns. The smoke version of benchmarks/disk_full.py runs a real daemon with its state_dir on a
real small filesystem (ext4 on a loop device, else tmpfs); it needs root and is skipped with the
reason otherwise. The other tests need no mount."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config.settings import ChunkingSettings, ClassSettings, CompressionSettings
from agent.errors import DiskFullError, QuotaExceededError
from agent.format.keys import generate_keys, load_edge_keys
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest
from agent.store import room as store_mod
from agent.store.fsio import write_durable
from agent.store.store import ChunkWork, ManifestWork, Store
from tests.kits.bench import load_report, run_benchmark
from tests.kits.smallfs import MiB, SmallFs, SmallFsUnavailable

CLASSES = (ClassSettings("normal", 0, "refuse"),)
CHUNKING = ChunkingSettings(min_size=32 << 10, avg_size=64 << 10, max_size=128 << 10,
                            pack_below=0)


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    gen = generate_keys(tmp_path / "keys", "disk-site")
    keys = load_edge_keys(gen.edge_dir / "recipient.pub", gen.edge_dir / "site.key",
                          gen.edge_dir / "dedup.key")
    store = Store(tmp_path / "state", CLASSES, None)
    yield Pipeline("disk-site", keys, store, CHUNKING, CompressionSettings())
    store.close()


def _ingest(pipeline: Pipeline, tmp_path: Path, name: str, size: int) -> IngestRequest:
    src = tmp_path / "src" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(bytes(range(256)) * (size // 256))
    return IngestRequest(src, "files", name, "normal")


def test_a_disk_with_less_than_the_headroom_refuses_with_what_where_and_how(
        pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = pipeline.store
    monkeypatch.setattr(store_mod, "free_bytes", lambda path: store_mod.DISK_HEADROOM_BYTES)
    req = _ingest(pipeline, tmp_path, "a.bin", 100_000)
    with pytest.raises(DiskFullError) as info:
        pipeline.ingest_file(req)
    assert isinstance(info.value, QuotaExceededError)  # sources back off as for the quota
    msg = str(info.value)
    assert "disk" in msg and str(store.state_dir) in msg and "free space" in msg, msg
    assert store.pending_objects() == 0 and list(store.staging_dir.iterdir()) == []
    assert req.path.exists()


def test_write_durable_leaves_nothing_behind_on_enospc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "writev", full)  # the same os module fsio uses
    with pytest.raises(OSError) as info:
        write_durable(tmp_path / "f", b"x" * 100)
    assert info.value.errno == errno.ENOSPC and info.value.filename  # names the file
    assert list(tmp_path.iterdir()) == []


def test_a_disk_full_after_the_commit_defers_promotion_and_hands_out_nothing_missing(
        pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit happened (accepted) but moving the files into place hit ENOSPC (a new
    directory block): the object stays accepted, its files wait in staging, and the uplink is
    given none of them until they are in place."""
    store = pipeline.store
    real = Store._move_into_place
    disk_full = True

    def move(self: Store, stage: Path) -> set[Path]:
        if disk_full:
            raise OSError(errno.ENOSPC, "No space left on device", str(stage))
        return real(self, stage)

    monkeypatch.setattr(Store, "_move_into_place", move)
    result = pipeline.ingest_file(_ingest(pipeline, tmp_path, "a.bin", 300_000))
    assert store.pending_objects() == 1  # accepted: the source may let go of it
    assert (store.staging_path(result.object_id) / "manifest").exists()
    assert store.next_work(time.time(), 1e12) is None  # nothing whose file is not in place

    disk_full = False  # space came back: the next claim moves the files into place
    seen: list[str] = []
    while (work := store.next_work(time.time(), 1e12)) is not None:
        assert work.path.exists(), work
        if isinstance(work, ManifestWork):
            store.mark_committed(work.object_id)
            break
        assert isinstance(work, ChunkWork)
        seen.append(work.chunk_id)
        store.mark_chunk_uploaded(work.chunk_id)
    assert len(seen) == result.new_chunks and store.pending_objects() == 0
    assert not store.staging_path(result.object_id).exists()


def test_disk_full_trial_smoke(tmp_path: Path) -> None:
    """A real daemon, state_dir on a 24 MiB filesystem, quota 1 GiB: refusal, ENOSPC mid-file,
    a restart and uploads on a disk another program holds full, then everything restored."""
    try:
        with SmallFs(tmp_path / "probe", 8 * MiB):
            pass
    except SmallFsUnavailable as e:
        pytest.skip(f"no small filesystem to fill: {e}")
    done = run_benchmark("disk_full", "--size", "24MiB", "--quiet", "6",
                         "--workdir", tmp_path / "trial", "--no-write",
                         "--report-json", tmp_path / "report.json", timeout=290)
    (rep,) = load_report(tmp_path / "report.json")
    assert rep.ok, "\n".join(p[:800] for p in rep.problems)
    assert done.returncode == 0, done.stderr
    # (1) clear refusal: once, with what/where/how, the rest left in the spool
    assert 0 < rep.accepted_files < rep.dropped_files
    assert rep.refusal_warnings == 1 and rep.quiet_warnings == 0
    assert "is full" in rep.refusal_message and "stays in place" in rep.refusal_message
    assert rep.disk_full_metric >= 1
    assert "No space left" in rep.midfile_refusal and rep.midfile_staged_bytes > 0
    # (3) resumes by itself when space returns, and when uploads free it
    assert rep.resume_after_grow_s is not None and rep.resume_after_window_s is not None
    # (2) no corruption, nothing lost: every file dropped comes back byte-identical
    assert rep.restored_files == rep.dropped_files + 1 and rep.verify_problems == 0
    assert "DiskFullError from OperationalError" in rep.commit_trial
