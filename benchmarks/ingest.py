"""Ingest and wire bytes: skyferry as its users run it vs `restic backup` vs `zstd -3 -T2`, on
the same corpus.

Ingest (benchmarks/ingest_product.py): **skyferry run + spool** is `skyferry run` with the
corpus (tests/kits/edge_corpus.py) hard-linked into a spool folder, windows closed, `level = 1`,
timed from the start of the process until it has exited after SIGTERM, which is sent once every
file is accepted (whole process: start-up and shutdown included; CPU and the daemon's peak RSS
from GNU time). **skyferry put** is `skyferry put CORPUS` to a running daemon (started first,
not timed): the command returns once every file is durable. `restic backup` into a fresh local
repository (default compression); `zstd -3 -T2` on a tar of the corpus. Each tool runs `--runs`
times, interleaved; the median of wall time, CPU time and peak RSS is reported, with throughput
as corpus bytes over wall time. `--child` adds the pipeline alone in a child process
(benchmarks/ingest_child.py), a profiling aid no acceptance line rests on.

Every run of every tool writes into a folder of its own, and nothing is deleted until all runs
are done. On ext4 without a journal (this machine's root filesystem) each new inode skips, one by
one, the inodes freed in the last 60-360 s, so deleting the previous run's store (~1,400 files)
just before the next run made that run pay for it, the most for the tool that creates the most
files: allocating inodes took 6 % of skyferry's CPU right after such a delete, 4 % a minute
later, 0.1 % in a folder with no recent deletions (perf, 2026-12-03). Leftovers of an earlier
invocation are deleted before the first run and still cost the runs within those minutes.
Each timed command starts after a `sync`: no run pays for writing back an earlier one's output.

Wire: the sealed bytes skyferry would upload (chunk and manifest files of the run + spool store)
vs restic's repository size vs an `rclone copy` to a `crypt` remote over a local folder; then 1 %
of the files are edited (tests.kits.edge_corpus.edit) and the edited corpus is spooled again, as
a new source, into the same store / backed up into the same repository: the bytes added are what
a re-send costs after dedup.

    python -m benchmarks.ingest [--size 1GiB] [--runs 3] [--workdir DIR] [--child]
        [--no-write] [--keep]

Peers missing from PATH are skipped with a line saying so (`sh benchmarks/setup.sh` installs
them). Writes the `ingest` section of benchmarks/RESULTS.md; exits 1 when an acceptance line of
issue 17 does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config.units import format_size, parse_size
from benchmarks.ingest_product import run_put, run_spool
from benchmarks.run import add_output_options, publish, write_report
from tests.kits import edge_corpus as corpus

RESULTS = Path(__file__).parent / "RESULTS.md"
SECTION = "ingest"
SITE = "bench-site"
RESTIC_PASSWORD = "skyferry-bench-not-a-secret"

# Acceptance (issue 17, line 3; wire and re-send: issue 6).
VS_RESTIC = 2.2
VS_ZSTD = 0.9
PUT_VS_RESTIC = 2.0
MAX_RSS = 150 * (1 << 20)
MAX_RESEND = 0.03
SPOOL, PUT, CHILD = "skyferry run + spool", "skyferry put", "pipeline child"


@dataclass(frozen=True)
class Run:
    wall_s: float
    cpu_s: float
    rss: int  # peak resident bytes of the child
    out_bytes: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tool:
    name: str
    command: str  # shown in RESULTS.md
    note: str = ""
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs))


# ---- measuring -------------------------------------------------------------------------------

def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int, str]:
    """Run cmd to completion: (wall s, user+sys CPU s, peak RSS bytes, stdout).

    CPU and peak RSS come from GNU time when it is installed: Linux carries the RSS high-water
    mark of a process across fork and exec, so `wait4` on a child forked from a large parent
    (pytest) reports the parent's size. GNU time is small, and the tool is its child.
    Dirty data of earlier commands is written out first (not timed), so none of it is written
    back while this one runs.
    """
    os.sync()
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    stats = Path(tempfile.mkstemp(prefix="skyferry-bench-")[1])
    full = [gnu_time, "-f", "%U %S %M", "-o", str(stats), *cmd] if gnu_time else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        proc = subprocess.run(full, capture_output=True, env={**os.environ, **(env or {})})
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                               f"{proc.stderr.decode(errors='replace')[-2000:]}")
        if gnu_time:
            user, system, rss_kib = stats.read_text().split()[-3:]
            cpu, rss = float(user) + float(system), int(rss_kib) * 1024
        else:
            # Without GNU time: CPU by difference; RSS is the largest of any child so far.
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = ru.ru_utime + ru.ru_stime - before.ru_utime - before.ru_stime
            rss = ru.ru_maxrss * 1024
    finally:
        stats.unlink(missing_ok=True)
    return wall, cpu, rss, proc.stdout.decode()


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files below path (what an upload of it would carry)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def store_bytes(state_dir: Path) -> int:
    """Sealed chunk and manifest bytes in a store: what uplink would put on the wire."""
    return tree_bytes(state_dir / "chunks") + tree_bytes(state_dir / "manifests")


def restic_cache(repo: Path) -> Path:
    """restic's cache for one repository, beside it (each run's repository has its own)."""
    return repo.with_name(repo.name + "-cache")


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


class Bench:
    def __init__(self, workdir: Path, size: int, seed: int, workers: int) -> None:
        self.workdir = workdir
        self.workers = workers
        self.corpus = workdir / f"corpus-{size}-{seed}"
        self.specs = corpus.generate(self.corpus, size, seed)
        self.corpus_bytes = sum(s.size for s in self.specs)
        self.keys = workdir / "keys"
        if not (self.keys / "edge" / "dedup.key").exists():
            fresh(self.keys)
            from agent.format.keys import generate_keys
            generate_keys(self.keys, SITE)
        self.restic = shutil.which("restic")
        self.zstd = shutil.which("zstd")
        self.rclone = shutil.which("rclone")
        self.tar = workdir / f"corpus-{size}-{seed}.tar"
        stamp = self.corpus / corpus.STAMP
        if self.zstd and (not self.tar.exists()
                          or self.tar.stat().st_mtime_ns < stamp.stat().st_mtime_ns):
            tmp = self.tar.with_suffix(".tmp")
            subprocess.run(["tar", "-cf", str(tmp), "-C", str(self.corpus), "."], check=True)
            tmp.rename(self.tar)

    # One run of each tool. Each leaves its output in workdir for the wire comparison.

    def skyferry(self, state: Path, root: Path | None = None, source: str = "corpus") -> Run:
        cmd = [sys.executable, "-m", "benchmarks.ingest_child", str(root or self.corpus),
               str(state), str(self.keys / "edge"), SITE, source, str(self.workers)]
        before = store_bytes(state) if state.exists() else 0
        wall, cpu, rss, out = measure(cmd)
        info = json.loads(out.strip().splitlines()[-1])
        return Run(wall, cpu, rss, store_bytes(state) - before, info)

    def spool(self, root: Path, corpus_dir: Path | None = None, source: str = "corpus") -> Run:
        p = run_spool(corpus_dir or self.corpus, root, self.keys / "edge", SITE, source)
        return Run(p.wall_s, p.cpu_s, p.rss, p.out_bytes, p.info)

    def put(self, root: Path) -> Run:
        p = run_put(self.corpus, root, self.keys / "edge", SITE)
        return Run(p.wall_s, p.cpu_s, p.rss, p.out_bytes, p.info)

    def restic_env(self, repo: Path) -> dict[str, str]:
        return {"RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": RESTIC_PASSWORD,
                "RESTIC_CACHE_DIR": str(restic_cache(repo))}

    def restic_init(self, repo: Path) -> None:
        assert self.restic
        if repo.exists():
            shutil.rmtree(repo)
        shutil.rmtree(restic_cache(repo), ignore_errors=True)
        measure([self.restic, "init", "--quiet"], self.restic_env(repo))

    def restic_backup(self, repo: Path, root: Path | None = None) -> Run:
        assert self.restic
        before = tree_bytes(repo)
        wall, cpu, rss, _ = measure([self.restic, "backup", "--quiet", str(root or self.corpus)],
                                    self.restic_env(repo))
        return Run(wall, cpu, rss, tree_bytes(repo) - before)

    def zstd_tar(self, out: Path) -> Run:
        assert self.zstd
        wall, cpu, rss, _ = measure([self.zstd, "-3", "-T2", "-q", "-f", str(self.tar),
                                     "-o", str(out)])
        return Run(wall, cpu, rss, out.stat().st_size)

    def rclone_crypt(self, dest: Path) -> Run:
        assert self.rclone
        fresh(dest)
        obscured = subprocess.run([self.rclone, "obscure", RESTIC_PASSWORD], check=True,
                                  capture_output=True, text=True).stdout.strip()
        env = {"RCLONE_CONFIG": "/dev/null", "RCLONE_CONFIG_BENCHCRYPT_TYPE": "crypt",
               "RCLONE_CONFIG_BENCHCRYPT_REMOTE": str(dest),
               "RCLONE_CONFIG_BENCHCRYPT_PASSWORD": obscured}
        wall, cpu, rss, _ = measure([self.rclone, "copy", str(self.corpus), "benchcrypt:"], env)
        return Run(wall, cpu, rss, tree_bytes(dest))


@dataclass
class Report:
    tools: dict[str, Tool]
    corpus_dir: Path
    corpus_bytes: int
    description: str
    wire: dict[str, int]  # tool -> bytes for the corpus
    resend: dict[str, int]  # tool -> bytes added by the edited corpus
    edit: corpus.EditReport | None
    verdicts: list[tuple[str, bool | None, str]]  # line, held (None: not measured), figure


def _tools(b: Bench, workers: int, peers: bool, child: bool) -> dict[str, Tool]:
    tools = {
        SPOOL: Tool(SPOOL, "skyferry run -c CONFIG", "corpus hard-linked into a spool first, "
                    "windows closed, level = 1, settle 0s, fresh store; whole process, until "
                    "it exits after SIGTERM sent once every file is accepted"),
        PUT: Tool(PUT, "skyferry put -c CONFIG CORPUS", "to a running daemon (windows closed, "
                  "level = 1, fresh store); CPU and RSS are the put command's, the daemon's "
                  "are in the notes below"),
        "restic": Tool("restic", "restic backup --quiet CORPUS",
                       "fresh repository, default compression"),
        "zstd": Tool("zstd", "zstd -3 -T2 -q -f CORPUS.tar -o OUT.zst"),
    }
    if child:
        tools[CHILD] = Tool(CHILD, f"python -m benchmarks.ingest_child CORPUS STATE KEYS {SITE} "
                            f"corpus {workers}", "profiling aid: agent.ingest.pipeline alone, "
                            f"{workers} ingest threads, fresh store")
    for name, found, pkg in (("restic", b.restic, "restic"), ("zstd", b.zstd, "zstd")):
        if not peers:
            tools[name].skipped = "peers not run (--skyferry-only)"
        elif not found:
            tools[name].skipped = f"`{pkg}` is not installed (sh benchmarks/setup.sh)"
    return tools


def run(workdir: Path, size: int, seed: int = 6, runs: int = 3, workers: int = 2,
        keep: bool = False, peers: bool = True, child: bool = False) -> Report:
    """Measure ingest (interleaved runs) and wire bytes; return the figures."""
    workdir.mkdir(parents=True, exist_ok=True)
    b = Bench(workdir, size, seed, workers)
    tools = _tools(b, workers, peers, child)
    # A folder per run, deleted only after the last (see the module's docstring); the last
    # run's store and repository serve the wire and re-send figures below.
    outputs = workdir / "runs"
    if outputs.exists():  # left by --keep or an interrupted invocation
        shutil.rmtree(outputs)
    for i in range(runs):
        out = outputs / str(i + 1)
        out.mkdir(parents=True)
        site, repo = out / "sky-run", out / "restic-repo"
        tools[SPOOL].runs.append(b.spool(site))
        tools[PUT].runs.append(b.put(out / "sky-put"))
        if child:
            tools[CHILD].runs.append(b.skyferry(fresh(out / "sky-child")))
        if not tools["restic"].skipped:
            b.restic_init(repo)
            tools["restic"].runs.append(b.restic_backup(repo))
        if not tools["zstd"].skipped:
            tools["zstd"].runs.append(b.zstd_tar(out / "corpus.tar.zst"))

    wire = {"skyferry": tools[SPOOL].runs[-1].out_bytes}
    if tools["restic"].runs:
        wire["restic"] = tools["restic"].runs[-1].out_bytes
    if peers and b.rclone:
        wire["rclone crypt"] = b.rclone_crypt(workdir / "rclone-crypt").out_bytes
        shutil.rmtree(workdir / "rclone-crypt", ignore_errors=True)

    # Re-send after a 1 % edit: a copy of the corpus, edited, spooled as a new source into
    # the store (and backed up into the repository) that already holds the original.
    edited = workdir / "corpus-edited"
    if edited.exists():
        shutil.rmtree(edited)
    shutil.copytree(b.corpus, edited)
    edit = corpus.edit(edited)
    resend = {"skyferry": b.spool(site, edited, "corpus-edited").out_bytes}
    if tools["restic"].runs:
        resend["restic"] = b.restic_backup(repo, edited).out_bytes
    if not keep:
        for p in (edited, outputs):
            shutil.rmtree(p, ignore_errors=True)

    report = Report(tools, b.corpus, b.corpus_bytes, corpus.describe(b.specs), wire, resend,
                    edit, [])
    report.verdicts = verdicts(report)
    return report


def verdicts(r: Report) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    for tool, peer, need in ((SPOOL, "restic", VS_RESTIC), (SPOOL, "zstd", VS_ZSTD),
                             (PUT, "restic", PUT_VS_RESTIC)):
        line = f"{tool} wall time: >= {need}x {peer}'s speed"
        t = r.tools[peer]
        if t.runs:
            ratio = t.median("wall_s") / r.tools[tool].median("wall_s")
            out.append((line, ratio >= need, f"{ratio:.2f}x"))
        else:
            out.append((line, None, "not measured"))
    rss = r.tools[SPOOL].median("rss")
    out.append(("skyferry run daemon peak RSS <= 150 MiB", rss <= MAX_RSS,
                f"{rss / (1 << 20):.0f} MiB"))
    if "restic" in r.wire:
        frac = r.wire["skyferry"] / r.wire["restic"]
        out.append(("wire bytes <= restic repository", frac <= 1.0, f"{frac:.3f}x"))
    else:
        out.append(("wire bytes <= restic repository", None, "not measured"))
    frac = r.resend["skyferry"] / r.corpus_bytes
    out.append(("1%-edited re-send <= 3% of corpus bytes", frac <= MAX_RESEND, f"{frac:.2%}"))
    return out


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f}"


def render(r: Report, argv: list[str], load: str) -> str:
    sky_wall = r.tools[SPOOL].median("wall_s")
    lines = [
        f"## Ingest and wire bytes (`python -m benchmarks.ingest{''.join(' ' + a for a in argv)}`)",
        "",
        f"Corpus (tests/kits/edge_corpus.py): {r.description}. Measured "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()} ({os.cpu_count()} "
        f"cores), Python {platform.python_version()}; page cache warm; median of "
        f"{len(r.tools[SPOOL].runs)} interleaved runs, each into a folder of its own (nothing "
        f"deleted until all are done) and after a `sync`; CPU and peak RSS from GNU time. "
        f"{load}",
        "",
        "| tool | command | wall s | each run, s | MiB/s | CPU s | peak RSS MiB | output MiB | "
        "run + spool speed-up |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in r.tools.values():
        if t.skipped:
            lines.append(f"| {t.name} | skipped: {t.skipped} | | | | | | | |")
            continue
        wall = t.median("wall_s")
        note = f" ({t.note})" if t.note else ""
        each = " ".join(f"{run.wall_s:.2f}" for run in t.runs)
        lines.append(
            f"| {t.name} | `{t.command}`{note} | {wall:.2f} | {each} | "
            f"{_mib(r.corpus_bytes / wall)} | {t.median('cpu_s'):.2f} | {_mib(t.median('rss'))} | "
            f"{_mib(t.runs[-1].out_bytes)} | {wall / sky_wall:.2f}x |")
    put = r.tools[PUT]
    daemon_cpu = statistics.median(x.info["daemon_cpu_s"] for x in put.runs)
    daemon_rss = statistics.median(x.info["daemon_vmhwm"] for x in put.runs)
    ingested = statistics.median(x.info["ingested_s"] for x in r.tools[SPOOL].runs)
    lines += ["", f"The daemon during `skyferry put` (median): CPU {daemon_cpu:.2f} s, peak RSS "
              f"{_mib(daemon_rss)} MiB (VmHWM); put said: `{put.runs[-1].info['summary']}`. "
              f"The run + spool daemon had accepted every file {ingested:.2f} s after it was "
              "started (median)."]
    lines += ["", "Wire bytes for the corpus (what each tool would upload):", "",
              "| tool | bytes | of corpus |", "| --- | ---: | ---: |"]
    for name, n in r.wire.items():
        lines.append(f"| {name} | {n:,} | {n / r.corpus_bytes:.1%} |")
    if r.edit:
        lines += ["", f"Re-send after editing 1% of the files ({r.edit.files} files, one "
                  f"{format_size(r.edit.bytes_changed // max(1, r.edit.files))} region each, "
                  f"in every size class), ingested as a new source into the same store / "
                  f"repository:", "", "| tool | bytes added | of corpus |",
                  "| --- | ---: | ---: |"]
        for name, n in r.resend.items():
            lines.append(f"| {name} | {n:,} | {n / r.corpus_bytes:.2%} |")
    lines += ["", "Acceptance (issue 17, line 3; wire bytes and re-send: issue 6):", ""]
    for line, held, figure in r.verdicts:
        mark = "not measured" if held is None else ("holds" if held else "**misses**")
        lines.append(f"- {line}: {figure} — {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="ingest threads (default 2)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/skyferry-bench"))
    ap.add_argument("--keep", action="store_true", help="keep stores and repositories")
    ap.add_argument("--skyferry-only", action="store_true", help="do not run the peers")
    ap.add_argument("--child", action="store_true",
                    help="also time the pipeline alone in a child process (profiling aid)")
    add_output_options(ap)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    r = run(args.workdir, parse_size(args.size), args.seed, args.runs, args.workers,
            args.keep, peers=not args.skyferry_only, child=args.child)
    load_after = os.getloadavg()[0]
    loaded = (": a shared, loaded machine, so the ratios measured side by side are what count"
              if max(load_before, load_after) > 1.5 else "")
    load = (f"Load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on "
            f"{os.cpu_count()} cores{loaded}.")
    write_report(r, args.report_json)
    return publish(SECTION, render(r, argv, load), not args.no_write, r.verdicts,
                   args.results)


if __name__ == "__main__":
    raise SystemExit(main())
