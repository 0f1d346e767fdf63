"""Compression level by budget: what each zstd level costs and saves, and what `level = "auto"`
picks when ingest is the bottleneck and when the link is.

Every row seals files into a fresh store through agent.ingest.pipeline (in a child process,
`--workers`
ingest threads, files grouped as a spool groups them), measured like benchmarks/ingest.py:
wall time, CPU and peak RSS from GNU time, wire bytes = the sealed chunk and manifest files.
`restic backup` (default compression) into a fresh repository gives the yardstick for the same
data in the same run.

- Fixed levels (`--levels`, default 1,3,6,9,12,16,17,18,19,19+ldm) run on a smaller corpus
  from the same generator (`--subset`, default 1/8 of `--size`: same mix of kinds and file
  sizes): levels 16 and up seal ~3-7 MiB per CPU second, too slow for the whole corpus in
  every row.
- The whole corpus runs three times: at default settings (`level = "auto"` with no link known,
  as benchmarks/ingest.py runs it), and with `auto` deciding, through AutoLevel as the daemon
  does (a look before the first file, then every RETUNE_EVERY_S seconds; the queue is the
  store's sealed bytes, the waiting bytes are the files not yet sealed, the link budget comes
  from a real forecast of the scenario's windows), under
  * an ingest-bound budget: an always-on link at 15 Mbit/s (~146 GB per 24 h), and
  * a link-bound budget: one pass a day at 15 Mbit/s, long enough for a quarter of the corpus.

    python -m benchmarks.compression [--size 1GiB] [--subset 0.125] [--levels 1,9,19+ldm]
        [--workers 2] [--workdir DIR] [--no-write]

Writes the `compression` section of benchmarks/RESULTS.md; exits 1 when an acceptance line of
issue 6 does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config.units import format_size, parse_size
from benchmarks.ingest import SITE, Bench, Run, fresh, measure, restic_cache, store_bytes
from benchmarks.run import add_output_options, publish, write_report
from tests.kits import edge_corpus as corpus

SECTION = "compression"
LEO_BPS = 15e6 / 8  # a typical LEO terminal's uplink, bytes/s
DEFAULT_LEVELS = "1,3,6,9,12,16,17,18,19,19+ldm"

# Acceptance (issue 6, line 2).
DEFAULT_VS_RESTIC = 1.0
AUTO_LINK_VS_RESTIC = 0.9


# ---- scenarios: the windows the policy is told about --------------------------------------------

def scenario(name: str, corpus_bytes: int) -> tuple[Any, float | None, str]:
    """(WindowSettings, uplink cap bytes/s, description) of a budget scenario."""
    from agent.config.settings import DailyWindow, WindowSettings
    from agent.uplink.budget import SAFETY

    if name == "ingest-bound":
        return (WindowSettings(mode="always"), LEO_BPS,
                "always-on link at 15 Mbit/s, ~146 GB per 24 h")
    if name == "link-bound":
        seconds = max(1, round(corpus_bytes / 4 / (LEO_BPS * SAFETY)))
        noon = 12 * 3600
        return (WindowSettings(mode="schedule", daily=(DailyWindow(noon, noon + seconds,
                                                                   LEO_BPS),)), None,
                f"one {seconds} s pass a day at 15 Mbit/s, "
                f"{format_size(int(seconds * LEO_BPS * SAFETY))} per 24 h")
    raise ValueError(f"unknown scenario {name!r}")


def link_budget(name: str, corpus_bytes: int, now: float) -> int | None:
    """The scenario's budget for the next 24 h, computed as the daemon computes it."""
    from agent.ingest.compression_policy import HORIZON_S
    from agent.uplink.budget import horizon_budget
    from agent.windows.forecast import build_forecast

    windows, uplink, _ = scenario(name, corpus_bytes)
    forecast = build_forecast(windows, now, now=now)
    return horizon_budget(forecast.upcoming(now, now + HORIZON_S), now, HORIZON_S, None, uplink)


# ---- the child: seal a tree at one setting ------------------------------------------------------

def seal_tree(root: Path, state_dir: Path, keys_dir: Path, mode: str, workers: int
              ) -> dict[str, Any]:
    """Seal every file below root into a fresh store; mode is "default", "level:N[+ldm]" or
    "auto:SCENARIO". Returns counts and, for auto, every level the policy chose."""
    from agent.config.settings import DEFAULT_CLASSES, ChunkingSettings, CompressionSettings
    from agent.format.keys import load_edge_keys
    from agent.ingest.compression_policy import RETUNE_EVERY_S, AutoLevel
    from agent.ingest.pipeline import Pipeline
    from agent.sources.spool_scan import plan, scan
    from agent.store.store import Store
    from benchmarks.ingest_child import seal_batch

    keys = load_edge_keys(keys_dir / "recipient.pub", keys_dir / "site.key",
                          keys_dir / "dedup.key")
    store = Store(state_dir, DEFAULT_CLASSES)
    chunking = ChunkingSettings()
    # The daemon's second sealing thread (agent/host/blocking.py Executors.seal).
    seal = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyferry-seal")
    if mode.startswith("level:"):
        spec = mode.removeprefix("level:")
        level = int(spec.removesuffix("+ldm"))
        pipeline = Pipeline(SITE, keys, store, chunking, CompressionSettings(level=level),
                            seal_thread=seal)
        pipeline.compressor.set_level(level, spec.endswith("+ldm"))
    else:
        pipeline = Pipeline(SITE, keys, store, chunking, CompressionSettings(),
                            seal_thread=seal)
    batches = plan(scan(root, None), chunking)
    total = sum(c.size for b in batches for c in b)
    waiting = [total]
    lock = threading.Lock()
    choices: list[dict[str, Any]] = []
    auto: AutoLevel | None = None
    done = threading.Event()
    started = time.monotonic()

    def retune() -> None:
        assert auto is not None
        budget = link_budget(mode.removeprefix("auto:"), total, time.time())
        with lock:
            left = waiting[0]
        if auto.update(store.used_bytes, left, budget) or not choices:
            c = auto.choice
            choices.append({"t": round(time.monotonic() - started, 2), "level": c.level,
                            "ldm": c.long_distance, "regime": c.regime, "reason": c.reason})

    def retune_loop() -> None:
        while not done.wait(RETUNE_EVERY_S):
            retune()

    if mode.startswith("auto:"):
        cpus = len(os.sched_getaffinity(0))
        auto = AutoLevel(pipeline.compressor, cpus, min(cpus, workers))
        retune()  # the daemon's first look, before the first file
        threading.Thread(target=retune_loop, daemon=True).start()

    def one(batch: list[Any]) -> tuple[int, int, int, int, int]:
        busy: AbstractContextManager[None] = (auto.ingest.sealing() if auto is not None
                                              else nullcontext())
        with busy:
            out = seal_batch(pipeline, batch, "corpus")
        with lock:
            waiting[0] -= sum(c.size for c in batch)
        return out

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, batches))
    finally:
        done.set()
        store.close()
    return {"files": sum(r[0] for r in results), "bytes": sum(r[1] for r in results),
            "chunks": sum(r[2] for r in results), "stored": sum(r[4] for r in results),
            "choices": choices}


# ---- the parent: rows, restic, the table --------------------------------------------------------

@dataclass
class Row:
    label: str
    data: str  # "corpus" or "subset"
    plain: int
    run: Run
    restic: int | None  # restic's repository for the same data, same run
    scenario: str = ""

    @property
    def wire(self) -> int:
        return self.run.out_bytes

    @property
    def choices(self) -> list[dict[str, Any]]:
        return list(self.run.info.get("choices", []))

    @property
    def levels(self) -> str:
        """What was sealed with: the fixed level, or the levels auto chose, in order."""
        if not self.choices:
            return "1" if self.label == DEFAULT_ROW else self.label.removeprefix("level ")
        seen: list[str] = []
        for c in self.choices:
            name = f"{c['level']}{'+LDM' if c['ldm'] else ''}"
            if not seen or seen[-1] != name:
                seen.append(name)
        return " → ".join(seen)


@dataclass
class Report:
    corpus_bytes: int
    subset_bytes: int
    description: str
    subset_description: str
    restic: dict[str, int]  # "corpus" / "subset" -> repository bytes
    restic_skipped: str | None
    rows: list[Row] = field(default_factory=list)
    scenarios: dict[str, str] = field(default_factory=dict)
    verdicts: list[tuple[str, bool | None, str]] = field(default_factory=list)

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)


DEFAULT_ROW = "default settings"
AUTO_INGEST_ROW = "auto, ingest-bound budget"
AUTO_LINK_ROW = "auto, link-bound budget"


def _child(b: Bench, state: Path, mode: str, workers: int, root: Path) -> Run:
    cmd = [sys.executable, "-m", "benchmarks.compression", "--child", str(root), str(state),
           str(b.keys / "edge"), mode, str(workers)]
    wall, cpu, rss, out = measure(cmd)
    info = json.loads(out.strip().splitlines()[-1])
    return Run(wall, cpu, rss, store_bytes(state), info)


def run(workdir: Path, size: int, seed: int = 6, subset: float = 0.125,
        levels: str = DEFAULT_LEVELS, workers: int = 2, peers: bool = True) -> Report:
    workdir.mkdir(parents=True, exist_ok=True)
    full = Bench(workdir, size, seed, workers)
    small = Bench(workdir, max(1 << 20, int(size * subset)), seed, workers)
    restic: dict[str, int] = {}
    skipped = None
    if not peers:
        skipped = "peers not run (--skyferry-only)"
    elif not full.restic:
        skipped = "`restic` is not installed (sh benchmarks/setup.sh)"
    else:
        for name, b in (("corpus", full), ("subset", small)):
            repo = workdir / f"compression-restic-{name}"
            b.restic_init(repo)
            restic[name] = b.restic_backup(repo).out_bytes
            shutil.rmtree(repo)
            shutil.rmtree(restic_cache(repo), ignore_errors=True)
    report = Report(full.corpus_bytes, small.corpus_bytes, corpus.describe(full.specs),
                    corpus.describe(small.specs), restic, skipped)
    state = workdir / "compression-state"
    for spec in [s.strip() for s in levels.split(",") if s.strip()]:
        r = _child(small, fresh(state), f"level:{spec}", workers, small.corpus)
        report.rows.append(Row(f"level {spec.replace('+ldm', '+LDM')}", "subset",
                               small.corpus_bytes, r, restic.get("subset")))
    for label, mode in ((DEFAULT_ROW, "default"), (AUTO_INGEST_ROW, "auto:ingest-bound"),
                        (AUTO_LINK_ROW, "auto:link-bound")):
        r = _child(full, fresh(state), mode, workers, full.corpus)
        name = mode.removeprefix("auto:")
        desc = scenario(name, full.corpus_bytes)[2] if mode.startswith("auto:") else ""
        report.rows.append(Row(label, "corpus", full.corpus_bytes, r, restic.get("corpus"),
                               desc))
        if desc:
            report.scenarios[name] = desc
    shutil.rmtree(state, ignore_errors=True)
    report.verdicts = verdicts(report)
    return report


def verdicts(r: Report) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    for label, need, line in (
            (DEFAULT_ROW, DEFAULT_VS_RESTIC,
             "wire bytes at default settings <= restic's repository (whole corpus)"),
            (AUTO_LINK_ROW, AUTO_LINK_VS_RESTIC,
             "auto with a link-bound budget: wire bytes <= 0.9x restic's repository "
             "(whole corpus)")):
        row = r.row(label)
        if row.restic is None:
            out.append((line, None, f"{row.wire:,} bytes; restic not measured"))
        else:
            frac = row.wire / row.restic
            out.append((line, frac <= need, f"{row.wire:,} / {row.restic:,} = {frac:.4f}x"))
    ingest = r.row(AUTO_INGEST_ROW)
    fast = all(c["level"] == 1 for c in ingest.choices) and bool(ingest.choices)
    out.append(("auto with an ingest-bound budget stays at level 1", fast,
                f"levels used: {ingest.levels}"))
    return out


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f}"


def render(r: Report, argv: list[str]) -> str:
    cmd = f"python -m benchmarks.compression{''.join(' ' + a for a in argv)}"
    lines = [
        f"## Compression level by budget (`{cmd}`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
        f"({os.cpu_count()} cores, shared), Python {platform.python_version()}, zstd via "
        f"python-zstandard; one run per row, 2 ingest threads, fresh store, page cache warm; "
        f"CPU and peak RSS from GNU time.",
        "",
        f"- **corpus**: {r.description}.",
        f"- **subset**: the same generator at {format_size(r.subset_bytes)} (same mix and "
        f"shape): {r.subset_description}. Fixed levels run here, since levels 16 and up seal "
        f"only a few MiB per CPU second.",
    ]
    for name, desc in r.scenarios.items():
        lines.append(f"- **{name} budget**: {desc}.")
    lines += [
        "",
        "Wire bytes are the sealed chunk and manifest files; *vs restic* compares with "
        "`restic backup`'s repository (default compression) for the same data in this run; "
        "*minutes* is the time to send the whole corpus at 15 Mbit/s (subset rows: scaled by "
        "their ratio).",
        "",
        "| setting | data | levels used | ingest MiB/s | CPU s | CPU s per GiB | peak RSS MiB "
        "| wire bytes | of plain | vs restic | minutes at 15 Mbit/s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if r.restic:
        for name, n in r.restic.items():
            plain = r.corpus_bytes if name == "corpus" else r.subset_bytes
            minutes = n / plain * r.corpus_bytes / LEO_BPS / 60
            lines.append(f"| restic backup (default compression) | {name} | | | | | | {n:,} | "
                         f"{n / plain:.1%} | 1.000x | {minutes:.1f} |")
    else:
        lines.append(f"| restic | skipped: {r.restic_skipped} | | | | | | | | | |")
    for row in r.rows:
        run = row.run
        gib = row.plain / (1 << 30)
        minutes = row.wire / row.plain * r.corpus_bytes / LEO_BPS / 60
        vs = f"{row.wire / row.restic:.3f}x" if row.restic else "–"
        lines.append(
            f"| {row.label} | {row.data} | {row.levels} | {_mib(row.plain / run.wall_s)} | "
            f"{run.cpu_s:.1f} | {run.cpu_s / gib:.0f} | {_mib(run.rss)} | {row.wire:,} | "
            f"{row.wire / row.plain:.1%} | {vs} | {minutes:.1f} |")
    lines += ["", "What auto chose (the daemon logs the same line as `compression_level`):", ""]
    for label in (DEFAULT_ROW, AUTO_INGEST_ROW, AUTO_LINK_ROW):
        row = r.row(label)
        if not row.choices:
            lines.append(f"- {label}: no policy running (the pipeline on its own starts at "
                         f"level 1, as `auto` does before the daemon's first look)")
            continue
        first = row.choices[0]
        lines.append(f"- {label}: {len(row.choices)} choice(s); first, at "
                     f"{first['t']:g} s: level {first['level']}{' +LDM' if first['ldm'] else ''}"
                     f" — {first['reason']}")
        for c in row.choices[1:]:
            lines.append(f"  - at {c['t']:g} s: level {c['level']}"
                         f"{' +LDM' if c['ldm'] else ''} — {c['reason']}")
    lines += ["", "Acceptance (issue 6):", ""]
    for line, held, figure in r.verdicts:
        mark = "not measured" if held is None else ("holds" if held else "**misses**")
        lines.append(f"- {line}: {figure} — {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        root, state, keys, mode, workers = argv[1:6]
        print(json.dumps(seal_tree(Path(root), Path(state), Path(keys), mode, int(workers))))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--subset", type=float, default=0.125,
                    help="size of the fixed-level corpus, as a fraction of --size")
    ap.add_argument("--levels", default=DEFAULT_LEVELS,
                    help=f"fixed levels to tabulate (N or N+ldm); default {DEFAULT_LEVELS}")
    ap.add_argument("--workers", type=int, default=2, help="ingest threads (default 2)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/skyferry-bench"))
    ap.add_argument("--skyferry-only", action="store_true", help="do not run restic")
    add_output_options(ap)
    args = ap.parse_args(argv)
    r = run(args.workdir, parse_size(args.size), args.seed, args.subset, args.levels,
            args.workers, peers=not args.skyferry_only)
    write_report(r, args.report_json)
    return publish(SECTION, render(r, argv), not args.no_write, r.verdicts, args.results)


if __name__ == "__main__":
    raise SystemExit(main())
