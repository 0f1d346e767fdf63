"""Backlog scale: the queue's operations on a site cut off for weeks (issue 17, acceptance 4).

The start-up test's synthetic index (tests/unit/test_startup.py: 100,000 queued objects,
250,000 sealed chunks of ~4 MiB, about 1 TB) is built at 1x, 10x and 40x (tests/kits/backlog.py:
bulk inserts in one transaction, secondary indexes rebuilt after) and cached under --cache,
keyed by size and by the schema the store creates, so re-runs skip the build. Each run copies
the cached store, drops the copy's index file from the page cache (a restart after a reboot,
not one that finds the index in memory), then times, through the store's own methods:

- opening the store (schema check, start-up recovery: claims of the dead run put back in line,
  bytes held counted);
- 1,000 claims (`next_work`) made the way the uplink makes them, 4 in flight: when every stream
  is busy the oldest claim is acknowledged (`mark_chunk_uploaded`, "mark sent", or
  `mark_committed` for a manifest) before the next claim;
- the status summary (`summary`, what `skyferry status`, the status page and the metrics read),
  median of 20.

    python -m benchmarks.backlog [--scales 1 10 40] [--claims 1000] [--cache DIR]

Prints one row per size and writes the `backlog` section of benchmarks/RESULTS.md (unless
--no-write); exits 1 when an acceptance line misses: median `next_work` <= 5 ms at every size,
opening <= 2 s at 10x.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from agent.store.store import Store
from benchmarks.run import add_output_options, publish, write_report
from tests.kits import backlog as kit

SECTION = "backlog"
CLAIM_MEDIAN_MS = 5.0
OPEN_S_AT_10X = 2.0
SUMMARY_RUNS = 20
STREAMS = 4


@dataclass
class Row:
    scale: float
    objects: int
    chunks: int
    index_bytes: int
    build_s: float
    built_now: bool
    open_s: float
    next_work_median_ms: float
    next_work_p99_ms: float
    next_work_max_ms: float
    mark_sent_median_ms: float
    commit_median_ms: float
    manifests: int
    summary_ms: float


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    verdicts: list[tuple[str, bool | None, str]] = field(default_factory=list)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    started: str = ""


def schema_key() -> str:
    """What the store creates today: a cached index built for another schema is not reused."""
    with tempfile.TemporaryDirectory() as tmp:
        Store(Path(tmp) / "s", kit.CLASSES).close()
        db = sqlite3.connect(Path(tmp) / "s" / "index.sqlite")
        try:
            sql = "\n".join(r[0] for r in db.execute(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"))
        finally:
            db.close()
    kit_src = Path(kit.__file__).read_bytes()
    return hashlib.sha256(sql.encode() + kit_src).hexdigest()[:12]


def cached(cache: Path, scale: float) -> tuple[Path, kit.Backlog, bool]:
    """The cached store at `scale` (built now if missing), its figures, and whether built now."""
    where = cache / f"x{scale:g}-{schema_key()}"
    meta = where / "backlog.json"
    if meta.exists():
        return where / "state", kit.Backlog(**json.loads(meta.read_text())), False
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".build-x{scale:g}-"))
    print(f"building the {scale:g}x index in {tmp} ...", flush=True)
    made = kit.build(tmp / "state", scale)
    (tmp / "backlog.json").write_text(json.dumps(made.__dict__))
    os.replace(tmp, where)
    return where / "state", made, True


def cold_copy(src: Path, dest: Path) -> None:
    """Copy the store, then drop the copy's index from the page cache (it is written back
    first), so opening it reads the disk as after a reboot."""
    shutil.copytree(src, dest)
    index = dest / "index.sqlite"
    fd = os.open(index, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(cache: Path, scale: float, claims: int) -> Row:
    state, made, built_now = cached(cache, scale)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".run-") as tmp:
        work = Path(tmp) / "state"
        cold_copy(state, work)
        t = time.perf_counter()
        store = Store(work, kit.CLASSES)
        open_s = time.perf_counter() - t
        try:
            assert store.used_bytes == made.stored_bytes, "start-up counted other bytes"
            uplink = kit.Uplink(store, STREAMS)
            for _ in range(claims):
                if uplink.step() is None:
                    raise SystemExit(f"the {scale:g}x backlog ran dry after "
                                     f"{len(uplink.round.next_work)} claims")
            summary = []
            for _ in range(SUMMARY_RUNS):
                t = time.perf_counter()
                store.summary(time.time())
                summary.append(time.perf_counter() - t)
        finally:
            store.close()
    r = uplink.round
    return Row(scale, made.objects, made.chunks, (state / "index.sqlite").stat().st_size,
               made.build_s, built_now, open_s, r.median_ms("next_work"), r.p99_ms("next_work"),
               max(r.next_work) * 1e3, r.median_ms("mark_sent"), r.median_ms("committed"),
               r.manifests, statistics.median(summary) * 1e3)


def verdicts(rows: list[Row]) -> list[tuple[str, bool | None, str]]:
    worst = max(rows, key=lambda r: r.next_work_median_ms)
    out: list[tuple[str, bool | None, str]] = [(
        f"median next_work <= {CLAIM_MEDIAN_MS:g} ms at every size",
        worst.next_work_median_ms <= CLAIM_MEDIAN_MS,
        f"worst {worst.next_work_median_ms:.2f} ms (at {worst.scale:g}x)")]
    at10 = [r for r in rows if r.scale == 10]
    out.append((f"opening the store <= {OPEN_S_AT_10X:g} s at 10x",
                None if not at10 else at10[0].open_s <= OPEN_S_AT_10X,
                "not run" if not at10 else f"{at10[0].open_s:.2f} s"))
    return out


def render(report: Report, argv: list[str]) -> str:
    busy = report.load[0] > 1.0
    lines = [
        f"## Backlog scale (`python -m benchmarks.backlog{''.join(' ' + a for a in argv)}`)",
        "",
        f"{report.started} UTC, {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}; load average "
        f"{report.load[0]:.1f} / {report.load[1]:.1f} / {report.load[2]:.1f} at the start"
        + (" (figures taken under load: the machine is shared)" if busy else "") + ".",
        "The start-up test's synthetic index scaled (1x: 100,000 queued objects, 250,000 "
        "chunks of 3-5 MiB, ~1 TB queued; 1.2% of chunks left 'uploading' by the dead run); "
        f"opened cold (page cache dropped for the index); {STREAMS} claims in flight, the "
        "oldest acknowledged before each new claim; summary: median of "
        f"{SUMMARY_RUNS}. Times in ms unless marked.",
        "",
        "| size | objects | chunks | index | open s | next_work median | p99 | max | "
        "mark sent median | commit median | summary | index built in |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        built = f"{r.build_s:.0f} s" + ("" if r.built_now else " (cached)")
        lines.append(
            f"| {r.scale:g}x | {r.objects:,} | {r.chunks:,} | {r.index_bytes / 2**30:.2f} GiB | "
            f"{r.open_s:.2f} | {r.next_work_median_ms:.2f} | {r.next_work_p99_ms:.2f} | "
            f"{r.next_work_max_ms:.1f} | {r.mark_sent_median_ms:.2f} | "
            f"{r.commit_median_ms:.2f} | {r.summary_ms:.2f} | {built} |")
    lines += ["", "Acceptance (issue 17, line 4):", ""]
    for line, held, figure in report.verdicts:
        mark = "not measured" if held is None else ("holds" if held else "**misses**")
        lines.append(f"- {line}: {figure} — {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.backlog", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 40.0])
    ap.add_argument("--claims", type=int, default=1000)
    ap.add_argument("--cache", type=Path,
                    default=Path(tempfile.gettempdir()) / "skyferry-backlog-cache",
                    help="where built indexes are kept for re-runs (40x: several GiB)")
    add_output_options(ap)
    args = ap.parse_args(argv)
    report = Report(load=os.getloadavg(), started=f"{datetime.now(UTC):%Y-%m-%d %H:%M}")
    for scale in args.scales:
        row = measure(args.cache, scale, args.claims)
        print(f"{scale:g}x: open {row.open_s:.2f} s, next_work median "
              f"{row.next_work_median_ms:.2f} ms p99 {row.next_work_p99_ms:.2f} ms, mark sent "
              f"{row.mark_sent_median_ms:.2f} ms, summary {row.summary_ms:.2f} ms "
              f"(built in {row.build_s:.0f} s{'' if row.built_now else ', cached'})", flush=True)
        report.rows.append(row)
    report.verdicts = verdicts(report.rows)
    write_report(report, args.report_json)
    return publish(SECTION, render(report, argv), not args.no_write, report.verdicts,
                   args.results)


if __name__ == "__main__":
    raise SystemExit(main())
