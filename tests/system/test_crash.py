"""Acceptance 4 of the core issue: `kill -9` anywhere is safe (DESIGN.md invariants 1 and 2).

The randomized trials run a real daemon and kill it at random instants during ingest and
upload; the tests below them pin each crash window of the store down by hand, so a failure
there names the window that broke.
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config.settings import ChunkingSettings, ClassSettings, CompressionSettings
from agent.format.crypto import EdgeKeys
from agent.format.keys import generate_keys, load_edge_keys
from agent.ingest.pipeline import Pipeline
from agent.ingest.requests import IngestRequest, IngestResult
from agent.store.store import ChunkWork, ManifestWork, Store
from agent.uplink.uplink import read_verified
from tests.kits.bench import run_benchmark

TRIALS = int(os.environ.get("SKYFERRY_CRASH_TRIALS", "20"))
SEED = int(os.environ.get("SKYFERRY_CRASH_SEED", "20261125"))
BOTH_ACTIVE = TRIALS // 4  # trials killed while ingest and upload were both active, at least

CLASSES = (
    ClassSettings("critical", 0, "refuse"),
    ClassSettings("high", 1, "refuse"),
    ClassSettings("normal", 2, "evict-oldest"),
    ClassSettings("bulk", 3, "evict-oldest"),
)
SMALL_CHUNKS = ChunkingSettings(min_size=64 << 10, avg_size=256 << 10, max_size=1 << 20)
AGING_S = 6 * 3600.0


@dataclass(frozen=True)
class Trials:
    """What `python -m benchmarks.crash_trials` printed: its summary line's counts, and every
    line (failing and hung trials are described above the summary)."""

    trials: int
    failures: int
    both_active_trials: int
    hung_stops: int
    output: str


SUMMARY = re.compile(r"crash trials: (\d+) trials, (\d+) failures, \d+ kills, (\d+) trials "
                     r"killed while ingest and upload were both active, (\d+) trials where a "
                     r"clean stop hung")


def run_trials(workdir: Path, seed: int) -> Trials:
    done = run_benchmark("crash_trials", "--trials", str(TRIALS), "--seed", str(seed),
                         "--jobs", "2", "--workdir", workdir, timeout=1200)
    print(done.stdout)
    match = SUMMARY.search(done.stdout)
    assert match, f"no summary line (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    summary = Trials(*map(int, match.groups()), output=done.stdout.strip())
    assert done.returncode == (1 if summary.failures else 0), done.stderr
    return summary


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> Trials:
    first = run_trials(tmp_path_factory.mktemp("crash"), SEED)
    if first.failures or first.both_active_trials >= BOTH_ACTIVE:
        return first
    # On a loaded machine the kills can miss the overlap of ingest and upload more often (a
    # fresh clone: 4 of 20, beside the rest of the suite): one more batch, on the next seed,
    # so that at least BOTH_ACTIVE kills still land in it.
    more = run_trials(tmp_path_factory.mktemp("crash-more"), SEED + 1)
    return Trials(first.trials + more.trials, first.failures + more.failures,
                  first.both_active_trials + more.both_active_trials,
                  first.hung_stops + more.hung_stops, f"{first.output}\n{more.output}")


def test_kill9_at_random_instants_loses_and_duplicates_nothing(trials: Trials) -> None:
    assert trials.trials >= 20
    assert not trials.failures, (
        f"{trials.failures} of {trials.trials} crash trials failed "
        f"(rerun with SKYFERRY_CRASH_SEED={SEED}, or the seed after it):\n{trials.output}")
    # The point is to crash while files are being ingested AND chunks uploaded; if kills keep
    # missing that overlap, the trial timing needs recalibrating, and the test says so.
    assert trials.both_active_trials >= BOTH_ACTIVE, (
        f"only {trials.both_active_trials} of {trials.trials} trials were killed while "
        "ingest and upload were both active; adjust TrialConfig.max_delay_ms or the file mix")


def test_clean_stop_after_crashes_does_not_hang(trials: Trials) -> None:
    """SIGTERM right after a (re)start must stop the daemon: systemd would SIGKILL it."""
    assert not trials.hung_stops, (
        f"SIGTERM hung in {trials.hung_stops} of {trials.trials} trials; no data was lost "
        "(see the other test), but a task swallowed its cancellation (on Python 3.11, "
        "asyncio.wait_for does when the awaited thing finishes as the cancel arrives; "
        "asyncio.timeout does not):\n" + trials.output)


# ---- the crash windows of the store, one by one -------------------------------------------------


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no cleanup, no `except Exception`."""


def _crash(*_args: object, **_kw: object) -> None:
    raise Crash


def _noop(*_args: object, **_kw: object) -> None:
    pass


@pytest.fixture
def keys(tmp_path: Path) -> EdgeKeys:
    edge = generate_keys(tmp_path / "keys", "t").edge_dir
    return load_edge_keys(edge / "recipient.pub", edge / "site.key", edge / "dedup.key")


def _open(state: Path) -> Store:
    return Store(state, CLASSES)


def _pipeline(store: Store, keys: EdgeKeys) -> Pipeline:
    return Pipeline("t", keys, store, SMALL_CHUNKS, CompressionSettings())


def _source_file(tmp_path: Path, name: str, size: int, seed: int) -> Path:
    p = tmp_path / "src" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(random.Random(seed).randbytes(size))
    return p


def _ingest(pipeline: Pipeline, path: Path) -> IngestResult:
    return pipeline.ingest_file(IngestRequest(path, "files", path.name, "normal"))


def _killed_during_commit(mp: pytest.MonkeyPatch, store: Store, pipeline: Pipeline, path: Path,
                          where: str) -> str:
    """Ingest `path` and 'kill' the process at `where` inside the commit; return the object id."""
    stage_root = store.staging_dir
    mp.setattr(store, where, _crash)
    mp.setattr(store, "abandon", _noop)  # a dead process cleans nothing up
    with pytest.raises(Crash):
        _ingest(pipeline, path)
    staged = [p.name for p in stage_root.iterdir()]
    assert len(staged) == 1, staged
    store.close()
    return staged[0]


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _drain(store: Store) -> None:
    """Play the uplink: claim every unit of work, check chunk files, acknowledge everything."""
    while (work := store.next_work(time.time(), AGING_S)) is not None:
        if isinstance(work, ChunkWork):
            read_verified(work.path, work.sealed_size, work.sealed_hash, work.chunk_id)
            store.mark_chunk_uploaded(work.chunk_id)
        else:
            assert isinstance(work, ManifestWork)
            assert work.path.is_file()
            store.mark_committed(work.object_id)


def test_committed_but_not_promoted_staging_is_promoted_at_next_open(
        tmp_path: Path, keys: EdgeKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    store = _open(state)
    src = _source_file(tmp_path, "big.bin", 2_000_000, seed=1)
    oid = _killed_during_commit(monkeypatch, store, _pipeline(store, keys), src,
                                "_move_into_place")

    store = _open(state)
    try:
        assert list(store.staging_dir.iterdir()) == [], "committed staging dir was not promoted"
        assert store.pending_objects() == 1
        assert store.manifest_path(oid).is_file()
        n_chunks = store.chunk_counts()["sealed"][0]
        assert n_chunks >= 3
        assert len(_files(store.chunks_dir)) == n_chunks
        _drain(store)  # every chunk file is in place and matches its recorded hash
        assert store.summary(time.time())["normal"].items == {"committed": 1}
        assert _files(store.chunks_dir) == [] and _files(store.manifests_dir) == []
    finally:
        store.close()


def test_moves_lost_by_a_power_cut_after_upload_leave_no_orphans(
        tmp_path: Path, keys: EdgeKeys) -> None:
    """The moves into place are not fsynced: a power cut can undo them after the uplink sent
    and removed the files. Start-up must not bring back what the index has let go."""
    state = tmp_path / "state"
    store = _open(state)
    oid = _ingest(_pipeline(store, keys), _source_file(tmp_path, "a.bin", 600_000, seed=3)
                  ).object_id
    saved = {p.name: p.read_bytes() for p in _files(store.chunks_dir)}
    saved["manifest"] = store.manifest_path(oid).read_bytes()
    _drain(store)
    assert _files(store.chunks_dir) == [] and _files(store.manifests_dir) == []
    store.close()
    # What the disk would hold if the renames (and the later unlinks) never reached it.
    stage = state / "staging" / oid
    stage.mkdir()
    for name, data in saved.items():
        (stage / name).write_bytes(data)

    store = _open(state)
    try:
        assert list(store.staging_dir.iterdir()) == []
        assert _files(store.chunks_dir) == [] and _files(store.manifests_dir) == []
        assert store.summary(time.time())["normal"].items == {"committed": 1}
    finally:
        store.close()


def test_partly_promoted_staging_is_finished_at_next_open(
        tmp_path: Path, keys: EdgeKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    store = _open(state)

    def promote_some_then_die(stage: Path) -> set[Path]:
        # Move the manifest and one chunk into place the way the commit does, then die.
        for moved, f in enumerate(sorted(stage.iterdir()), start=1):
            dest = (store.manifest_path(stage.name) if f.name == "manifest"
                    else store.chunk_path(f.name))
            dest.parent.mkdir(exist_ok=True)
            os.replace(f, dest)
            if moved == 2:
                raise Crash
        return set()

    src = _source_file(tmp_path, "big.bin", 2_000_000, seed=2)
    monkeypatch.setattr(store, "_move_into_place", promote_some_then_die)
    monkeypatch.setattr(store, "abandon", _noop)
    with pytest.raises(Crash):
        _ingest(_pipeline(store, keys), src)
    left_in_stage = _files(store.staging_dir)
    assert left_in_stage, "the simulated crash should leave some files staged"
    store.close()

    store = _open(state)
    try:
        assert list(store.staging_dir.iterdir()) == []
        _drain(store)
        assert store.pending_objects() == 0
        assert _files(store.chunks_dir) == [] and _files(store.manifests_dir) == []
    finally:
        store.close()


def test_uncommitted_staging_is_removed_and_the_source_keeps_the_data(
        tmp_path: Path, keys: EdgeKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    store = _open(state)
    src = _source_file(tmp_path, "big.bin", 2_000_000, seed=3)
    _killed_during_commit(monkeypatch, store, _pipeline(store, keys), src, "commit_object")
    (store.staging_dir / "stray-file").write_bytes(b"x")
    (store.manifests_dir / ".half-written.tmp").write_bytes(b"x")

    store = _open(state)
    try:
        assert list(store.staging_dir.iterdir()) == [], "uncommitted staging was not removed"
        assert list(store.manifests_dir.iterdir()) == []
        assert store.pending_objects() == 0
        assert store.chunk_counts() == {}
        assert _files(store.chunks_dir) == []
        assert store.used_bytes == 0
        # Nothing was accepted, so the producer's file is still there and ingests normally.
        result = _ingest(_pipeline(store, keys), src)
        assert result.duplicate_of is None and store.pending_objects() == 1
    finally:
        store.close()


def test_chunks_left_uploading_go_back_to_sealed(tmp_path: Path, keys: EdgeKeys) -> None:
    state = tmp_path / "state"
    store = _open(state)
    _ingest(_pipeline(store, keys), _source_file(tmp_path, "big.bin", 3_000_000, seed=4))
    total = store.chunk_counts()["sealed"][0]
    claimed = []
    for _ in range(3):
        work = store.next_work(time.time(), AGING_S)
        assert isinstance(work, ChunkWork)
        claimed.append(work.chunk_id)
    assert store.chunk_counts()["uploading"][0] == 3
    store.close()  # killed with three uploads in flight: nobody released them

    store = _open(state)
    try:
        counts = store.chunk_counts()
        assert "uploading" not in counts, counts
        assert counts["sealed"][0] == total
        again = store.next_work(time.time(), AGING_S)
        assert isinstance(again, ChunkWork) and again.chunk_id == claimed[0]
        store.release_chunk(again.chunk_id)
        _drain(store)
        assert store.pending_objects() == 0
    finally:
        store.close()


def test_crash_between_commit_and_local_delete_leaves_no_orphans(
        tmp_path: Path, keys: EdgeKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    store = _open(state)
    _ingest(_pipeline(store, keys), _source_file(tmp_path, "big.bin", 2_000_000, seed=5))
    manifest_work = None
    while (work := store.next_work(time.time(), AGING_S)) is not None:
        if isinstance(work, ManifestWork):
            manifest_work = work
            break
        store.mark_chunk_uploaded(work.chunk_id)
    assert manifest_work is not None
    monkeypatch.setattr(store, "_remove_object_files", _crash)
    with pytest.raises(Crash):
        store.mark_committed(manifest_work.object_id)  # the cloud acknowledged the manifest
    assert _files(store.chunks_dir) and manifest_work.path.is_file()
    store.close()

    store = _open(state)
    try:
        assert store.pending_objects() == 0
        assert _files(store.chunks_dir) == [], "chunk files of a committed object were stranded"
        assert not manifest_work.path.exists(), "manifest of a committed object was stranded"
    finally:
        store.close()
