"""Smoke run of benchmarks/ingest.py (the product: `skyferry run`, `skyferry put`) on a tiny
corpus, so the benchmark does not rot.

Peers (restic, zstd, rclone) run when installed and are skipped otherwise; skyferry's own figures
are checked for sanity either way. The acceptance ratios are not asserted here: on a few MiB
they mean nothing (process start-up dominates).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

from tests.kits import edge_corpus as corpus
from tests.kits.bench import exit_code_for, load_report, run_benchmark

SIZE = 4 << 20


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in corpus.files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_corpus_is_deterministic_and_has_the_mix(tmp_path: Path) -> None:
    specs = corpus.generate(tmp_path / "a", SIZE, seed=3)
    corpus.generate(tmp_path / "b", SIZE, seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert sum(s.size for s in specs) == sum(
        p.stat().st_size for p in corpus.files(tmp_path / "a"))
    total = sum(s.size for s in specs)
    for kind, share in corpus.KINDS.items():
        got = sum(s.size for s in specs if s.kind == kind) / total
        assert abs(got - share) < 0.02, (kind, got)
    classes = {s.name.split("/", 1)[0] for s in specs}
    assert classes == set(corpus.CLASSES)
    # At 1 GiB: thousands of small files, tens of medium ones, a few of 100+ MiB.
    full = corpus.plan(1 << 30, seed=6)
    count = {c: sum(1 for s in full if s.name.startswith(c + "/")) for c in corpus.CLASSES}
    assert count["small"] >= 1000 and 10 <= count["medium"] < 100 and count["large"] <= 5
    assert sum(1 for s in full if s.size >= 100 << 20) >= 2


def test_ingest_benchmark_smoke(tmp_path: Path) -> None:
    """The product runs (`skyferry run` over a spool, `skyferry put` to a daemon) on 4 MiB."""
    started = time.monotonic()
    done = run_benchmark("ingest", "--size", "4MiB", "--runs", "1",
                         "--workdir", tmp_path, "--no-write",
                         "--report-json", tmp_path / "report.json", timeout=120)
    assert time.monotonic() - started < 60  # ~15 s on a quiet machine
    r = load_report(tmp_path / "report.json")
    assert done.returncode == exit_code_for(r.verdicts), done.stderr

    specs = corpus.plan(SIZE)
    (spool,) = r.tools["skyferry run + spool"].runs
    assert spool.info["files"] == len(specs)
    assert 0 < spool.info["ingested_s"] < spool.wall_s < 30 and spool.cpu_s > 0
    # The corpus is ~80 % compressible text and records: sealed output must be smaller, and
    # never below what zstd could plausibly reach.
    assert 0.15 * SIZE < spool.out_bytes < 0.8 * SIZE
    assert 20 << 20 < spool.rss < 400 << 20  # the daemon's, from GNU time
    (put,) = r.tools["skyferry put"].runs
    # Everything put (the corpus stamp too), in one pack at this size.
    assert put.info["summary"] == (f"{r.corpus_dir}: {len(specs) + 1} files accepted "
                                   "(4.0 MiB) in 1 object")
    assert abs(put.out_bytes - spool.out_bytes) < 0.05 * spool.out_bytes
    assert 0 < put.wall_s < 30 and 20 << 20 < put.info["daemon_vmhwm"] < 400 << 20
    # The 1 % edit re-sends something, and much less than the corpus.
    assert r.edit is not None and r.edit.files >= 3
    assert 0 < r.resend["skyferry"] < 0.5 * spool.out_bytes

    for name, tool in (("restic", "restic"), ("zstd", "zstd")):
        t = r.tools[name]
        if shutil.which(tool):
            assert t.skipped is None and len(t.runs) == 1 and t.runs[0].out_bytes > 0
        else:
            assert t.skipped is not None and "not installed" in t.skipped
    if shutil.which("restic"):
        assert r.wire["restic"] > 0 and r.resend["restic"] > 0

    text = done.stdout
    assert text.startswith("## Ingest and wire bytes (`python -m benchmarks.ingest --size 4MiB ")
    assert "| skyferry run + spool |" in text and "Acceptance" in text
    for line, held, _ in r.verdicts:
        assert held is not None or "not measured" in dict(
            (v[0], v[2]) for v in r.verdicts)[line]
