"""Crash trials: `kill -9` the daemon at random instants during ingest and upload, then prove
that every accepted file comes back exactly once and intact (DESIGN.md invariants 1 and 2).

One trial, on a throw-away site of its own (keys, config, spool, local-folder cloud):

1. drop a mix of files (empty, small, compressible text, multi-chunk random binaries, an exact
   copy and an edited copy of a big one, nested and unicode names) the way a producer does:
   temporary name, then rename;
2. start the daemon, wait a random 0..max_delay ms (counted from its "started" log line, or
   sometimes from the spawn, so start-up and reconciliation are hit too) and `kill -9` it;
   right after each kill, every file gone from the spool ("accepted") must have its object in
   the index; more files are dropped after the first kill; one to three kills per trial;
3. restart and let it drain, stop it cleanly, then check: each dropped name has exactly one
   manifest in the cloud, restore yields every file byte-identical with its mtime and reports
   nothing superseded, verify is clean, the index holds exactly one committed object per file,
   no chunk was found corrupt, and no local chunk, manifest or staging file is left behind.

A clean stop (SIGTERM) that hangs is counted apart: it loses nothing, but it is a bug.

    python -m benchmarks.crash_trials --trials 200 [--seed N] [--jobs 2] [--workdir DIR]

prints each failing trial (and each hung stop) and a summary line; exits 1 when any trial
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.backends.registry import open_backend
from agent.cloud.restore import Restorer, site_key_loader
from agent.cloud.restore_read import RestoreReport
from agent.format import crypto
from agent.format.keys import load_dedup_key, load_recipient_private
from agent.sources.spool_scan import scan
from tests.kits.site import Site, drop_file, tree_digest

SPOOL = "files"
SMALL_CHUNKING = {"min_size": "64KiB", "avg_size": "256KiB", "max_size": "1MiB"}
_WORDS = ["satellite", "uplink", "ferry", "window", "queue", "sensor", "données", "日本", "ü"]


@dataclass(frozen=True)
class TrialFile:
    name: str  # relative to the spool root, POSIX separators
    data: bytes
    mtime_ns: int


@dataclass
class KillRecord:
    """What the site looked like right after one `kill -9`."""

    delay_ms: float
    anchor: str  # "started" (delay counted from the daemon's started line) or "spawn"
    started: bool  # the daemon had logged "started" before it was killed
    dropped: int  # files dropped so far
    accepted: int  # of those, gone from the spool
    queued_objects: int  # in the index, not yet committed in the cloud
    committed_objects: int
    uploading_chunks: int
    staging_dirs: int  # ingests caught between staging and promotion

    @property
    def ingest_active(self) -> bool:
        return self.started and self.accepted < self.dropped

    @property
    def upload_active(self) -> bool:
        return self.started and (self.queued_objects > 0 or self.uploading_chunks > 0)

    @property
    def both_active(self) -> bool:
        return self.ingest_active and self.upload_active


@dataclass
class TrialResult:
    index: int
    files: int
    bytes: int
    kills: list[KillRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    hung_stops: list[str] = field(default_factory=list)  # not a data problem; reported apart
    seconds: float = 0.0
    root: Path | None = None  # kept on failure (or with keep=True) for a post-mortem

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def killed_while_both_active(self) -> bool:
        return any(k.both_active for k in self.kills)

    def describe(self) -> str:
        kills = "; ".join(
            f"kill {i + 1} at +{k.delay_ms:.0f} ms from {k.anchor}: {k.accepted}/{k.dropped} "
            f"accepted, {k.queued_objects} queued, {k.committed_objects} committed, "
            f"{k.uploading_chunks} uploading, {k.staging_dirs} staging"
            for i, k in enumerate(self.kills))
        head = f"trial {self.index}: {'ok' if self.ok else 'FAILED'} ({kills})"
        if self.root is not None:
            head += f" [site kept at {self.root}]"
        hung = [f"clean stop hung: {h}" for h in self.hung_stops]
        return "\n    ".join([head, *self.problems, *hung])


@dataclass
class TrialsSummary:
    results: list[TrialResult]
    seconds: float
    seed: int

    @property
    def trials(self) -> int:
        return len(self.results)

    @property
    def failures(self) -> list[TrialResult]:
        return [r for r in self.results if not r.ok]

    @property
    def kills(self) -> int:
        return sum(len(r.kills) for r in self.results)

    @property
    def both_active_trials(self) -> int:
        return sum(r.killed_while_both_active for r in self.results)

    @property
    def hung_stops(self) -> list[TrialResult]:
        return [r for r in self.results if r.hung_stops]

    def line(self) -> str:
        per = self.seconds / max(1, self.trials)
        return (f"crash trials: {self.trials} trials, {len(self.failures)} failures, "
                f"{self.kills} kills, {self.both_active_trials} trials killed while ingest "
                f"and upload were both active, {len(self.hung_stops)} trials where a clean stop "
                f"hung, {self.seconds:.1f} s ({per:.2f} s/trial), seed {self.seed}")

    def report(self) -> str:
        """The summary line, preceded by what went wrong in each failing trial."""
        return "\n".join([*(r.describe() for r in self.failures), self.line()])

    def hung_report(self) -> str:
        return "\n".join([*(r.describe() for r in self.hung_stops), self.line()])


# ---- the files of one trial -------------------------------------------------------------------


def _text(rng: random.Random, size: int) -> bytes:
    return " ".join(rng.choice(_WORDS) for _ in range(size // 5 + 1)).encode()[:size]


def make_files(rng: random.Random, tag: str, big_max: int) -> list[TrialFile]:
    """A mix that covers empty, small, compressible, multi-chunk and deduplicated objects."""
    base = int(time.time() - 3 * 86400) * 1_000_000_000
    out: list[tuple[str, bytes]] = [
        (f"{tag}/empty.bin", b""),
        (f"{tag}/one.bin", rng.randbytes(1)),
        (f"{tag}/notes-données-日本.txt", _text(rng, rng.randint(100, 40_000))),
        (f"{tag}/deep/er/log.csv", _text(rng, rng.randint(20_000, 200_000))),
    ]
    out += [(f"{tag}/small-{k}.bin", rng.randbytes(rng.randint(2, 60_000))) for k in range(3)]
    bigs = [rng.randbytes(rng.randint(big_max // 3, big_max)) for _ in range(3)]
    out += [(f"{tag}/big/b{k}.bin", b) for k, b in enumerate(bigs)]
    # Same bytes under another name: every chunk deduplicated, still its own object.
    out.append((f"{tag}/big/b0-copy.bin", bigs[0]))
    # A 4 KiB edit in the middle: most chunks shared with b1, one or two new.
    mid = len(bigs[1]) // 2
    out.append((f"{tag}/big/b1-edited.bin", bigs[1][:mid] + rng.randbytes(4096)
                + bigs[1][mid + 4096:]))
    rng.shuffle(out)
    return [TrialFile(name, data, base + i * 1_000_003_000) for i, (name, data) in enumerate(out)]


# ---- one trial --------------------------------------------------------------------------------


@dataclass
class TrialConfig:
    max_delay_ms: float = 500.0  # after "started": about the time ingest of the set takes
    spawn_anchor_p: float = 0.15  # kills counted from the spawn: hit start-up/reconcile too
    spawn_delay_ms: float = 900.0  # after the spawn: imports, store open, reconcile, first work
    max_kills: int = 3
    late_files: int = 3  # dropped after the first kill
    big_max: int = 3_000_000  # bytes; with SMALL_CHUNKING a big file has a few chunks
    start_timeout_s: float = 30.0
    drain_timeout_s: float = 90.0
    stop_timeout_s: float = 10.0  # a clean stop (SIGTERM) after the drain
    hung_stop_retries: int = 2


def _source_key(dedup_key: bytes, name: str, f: TrialFile) -> str:
    # Mirrors Pipeline.source_key: the identity under which the store records an accepted file.
    ident = f"{SPOOL}\0{name}\0{len(f.data)}\0{f.mtime_ns}".encode()
    return crypto.keyed_hash(dedup_key, ident)


def _index(site: Site) -> sqlite3.Connection | None:
    path = site.state / "index.sqlite"
    if not path.exists():
        return None
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _query(site: Site, sql: str) -> list[tuple[Any, ...]]:
    db = _index(site)
    if db is None:
        return []
    try:
        return db.execute(sql).fetchall()
    except sqlite3.OperationalError:  # killed before the schema existed
        return []
    finally:
        db.close()


def _log_since(site: Site, offset: int) -> list[dict[str, Any]]:
    if not site.log_path.exists():
        return []
    with open(site.log_path, "rb") as f:
        f.seek(offset)
        raw = f.read()
    out = []
    for line in raw.decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _has_started(site: Site, offset: int) -> bool:
    return any(e.get("event") == "started" for e in _log_since(site, offset))


def _log_size(site: Site) -> int:
    return site.log_path.stat().st_size if site.log_path.exists() else 0


def _spool_names(site: Site) -> set[str]:
    return {c.name for c in scan(site.spool(SPOOL), None)}


class _Trial:
    def __init__(self, index: int, root: Path, rng: random.Random, cfg: TrialConfig) -> None:
        self.index = index
        self.rng = rng
        self.cfg = cfg
        spool = root / "spool" / SPOOL
        self.site = Site(root, site_id=f"crash-{index:04d}", spools={SPOOL: "normal"}, extra={
            "chunking": SMALL_CHUNKING,
            # Files are complete when they appear (renamed in), so no settle time is needed.
            "spool": [{"name": SPOOL, "path": str(spool), "priority": "normal",
                       "settle": "0s", "scan_interval": "0.1s"}],
        })
        self.files = make_files(rng, f"t{index:04d}", cfg.big_max)
        self.dropped: dict[str, TrialFile] = {}
        self.dedup_key = load_dedup_key(self.site.keys.edge_dir / "dedup.key")
        self.result = TrialResult(index, len(self.files), sum(len(f.data) for f in self.files))

    def problem(self, text: str) -> None:
        self.result.problems.append(text)

    def drop(self, files: list[TrialFile]) -> None:
        for f in files:
            drop_file(self.site.spool(SPOOL), f.name, f.data, mtime_ns=f.mtime_ns)
            self.dropped[f.name] = f

    def run(self) -> TrialResult:
        late = self.cfg.late_files
        self.drop(self.files[:-late] if late else self.files)
        kills = self.rng.randint(1, self.cfg.max_kills)
        for k in range(kills):
            if not self.crash_once(k):
                return self.result
            if k == 0 and late:
                self.drop(self.files[-late:])
        if self.drain():
            self.check_final()
        return self.result

    def crash_once(self, k: int) -> bool:
        """Start the daemon, kill -9 it at a random instant, check what was accepted survived."""
        site = self.site
        offset = _log_size(site)
        site.start()
        assert site.proc is not None
        if self.rng.random() < self.cfg.spawn_anchor_p:
            anchor, limit = "spawn", self.cfg.spawn_delay_ms
        else:
            anchor, limit = "started", self.cfg.max_delay_ms
            deadline = time.monotonic() + self.cfg.start_timeout_s
            while not _has_started(site, offset):
                if site.proc.poll() is not None or time.monotonic() > deadline:
                    self.problem(f"start {k + 1}: the daemon did not start (exit "
                                 f"{site.proc.poll()}):\n{site.log_tail()}")
                    site.close()
                    return False
                time.sleep(0.005)
        delay = self.rng.uniform(0, limit)
        time.sleep(delay / 1000)
        if site.proc.poll() is not None:
            self.problem(f"start {k + 1}: the daemon exited by itself with "
                         f"{site.proc.returncode} before the kill:\n{site.log_tail()}")
            return False
        site.kill9()
        self.result.kills.append(self.after_kill(k, delay, anchor, _has_started(site, offset)))
        return True

    def after_kill(self, k: int, delay: float, anchor: str, started: bool) -> KillRecord:
        left = _spool_names(self.site)
        accepted = [n for n in self.dropped if n not in left]
        objects = dict(_query(self.site, "SELECT source_key, state FROM objects"))
        # Small files are sealed in packs: their source keys are kept per file.
        objects.update(_query(self.site, "SELECT s.source_key, o.state FROM object_sources s "
                                         "JOIN objects o ON o.id=s.object_id"))
        for name in accepted:
            key = _source_key(self.dedup_key, name, self.dropped[name])
            if objects.get(key) not in ("queued", "committed"):
                self.problem(f"kill {k + 1}: {name} was accepted (gone from the spool) but the "
                             f"index has no queued or committed object for it "
                             f"(state {objects.get(key)!r})")
        states = Counter(s for (s,) in _query(self.site, "SELECT state FROM objects"))
        uploading = _query(self.site, "SELECT COUNT(*) FROM chunks WHERE state='uploading'")
        staging = self.site.state / "staging"
        return KillRecord(
            delay_ms=delay, anchor=anchor, started=started, dropped=len(self.dropped),
            accepted=len(accepted), queued_objects=states.get("queued", 0),
            committed_objects=states.get("committed", 0),
            uploading_chunks=uploading[0][0] if uploading else 0,
            staging_dirs=len(list(staging.iterdir())) if staging.exists() else 0,
        )

    def drain(self) -> bool:
        """Last start: until every file is committed in the cloud; then a clean stop.

        A stop that hangs is recorded (it is a bug, but not a lost or duplicated file), the
        daemon is killed, and one more start lets reconciliation tidy up before the checks.
        """
        for _ in range(1 + self.cfg.hung_stop_retries):
            if not self.run_until_drained():
                return False
            try:
                rc = self.site.stop(timeout=self.cfg.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.result.hung_stops.append(
                    f"SIGTERM after the drain: still running {self.cfg.stop_timeout_s:.0f} s "
                    f"later; last log lines:\n{self.site.log_tail(4)}")
                self.site.kill9()
                continue
            if rc != 0:
                self.problem(f"final run: clean stop exited {rc}:\n{self.site.log_tail()}")
            return True
        self.problem(f"final run: SIGTERM hung {1 + self.cfg.hung_stop_retries} times in a row")
        return False

    def run_until_drained(self) -> bool:
        site = self.site
        offset = _log_size(site)
        site.start()
        assert site.proc is not None
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        # Until it is up: a SIGTERM before the handlers exist would kill it, not stop it.
        while not _has_started(site, offset):
            if site.proc.poll() is not None or time.monotonic() > deadline:
                self.problem(f"final run: the daemon did not start (exit {site.proc.poll()}):"
                             f"\n{site.log_tail()}")
                site.close()
                return False
            time.sleep(0.005)
        while True:
            if site.proc.poll() is not None:
                self.problem(f"final run: the daemon exited with {site.proc.returncode}:\n"
                             f"{site.log_tail()}")
                return False
            if not _spool_names(site):
                rows = _query(site, "SELECT COUNT(*) FROM objects WHERE state='queued'")
                if rows and rows[0][0] == 0:
                    return True
            if time.monotonic() > deadline:
                self.problem(f"final run: not drained after {self.cfg.drain_timeout_s:.0f} s "
                             f"({len(_spool_names(site))} files still in the spool):\n"
                             f"{site.log_tail()}")
                site.close()
                return False
            time.sleep(0.05)

    def check_final(self) -> None:
        site = self.site
        expected = {n: (len(f.data), _blake3(f.data)) for n, f in self.dropped.items()}
        # The index: every file in exactly one committed object (alone or in a pack), nothing
        # else, no chunk found corrupt.
        states: Counter[str] = Counter()
        for state, items in _query(site, "SELECT state, items FROM objects"):
            states[state] += items
        if states != Counter({"committed": len(expected)}):
            self.problem(f"index files by object state {dict(states)}, expected exactly "
                         f"{len(expected)} committed (each file once)")
        corrupt = _query(site, "SELECT id FROM chunks WHERE state='corrupt'")
        if corrupt:
            self.problem(f"{len(corrupt)} chunks marked corrupt, e.g. {corrupt[0][0]}")
        for e in _log_since(site, 0):
            if e.get("level") in ("error", "critical") or e.get("event") == "chunk_corrupt":
                self.problem(f"daemon logged {e.get('event')}: {e.get('msg')}")
        # Local copies go once the manifest is acknowledged; a crash must not strand them.
        leftovers = [p.relative_to(site.state).as_posix()
                     for d in ("chunks", "manifests", "staging")
                     for p in (site.state / d).rglob("*") if not p.is_dir()]
        if leftovers:
            self.problem(f"{len(leftovers)} local files left after everything was committed, "
                         f"e.g. {leftovers[:3]}")
        out = site.root / "restored"
        names, restore, verify = asyncio.run(_cloud_checks(site, out))
        per_name = Counter(m for m in names)
        for name in expected:
            if per_name.get(name, 0) != 1:
                self.problem(f"{name}: in {per_name.get(name, 0)} manifests in the cloud, "
                             "expected 1")
        for name in set(per_name) - set(expected):
            self.problem(f"{name}: in the cloud but never dropped")
        for what, report in (("restore", restore), ("verify", verify)):
            for p in report.problems:
                self.problem(f"{what}: {p.what}: {p.reason}")
        if restore.superseded:
            self.problem(f"restore skipped {restore.superseded} superseded versions: an accepted "
                         "file was uploaded more than once")
        if restore.objects_ok != len(expected):
            self.problem(f"restore yielded {restore.objects_ok} objects, expected {len(expected)}")
        got = tree_digest(out / site.site_id / SPOOL) if (out / site.site_id / SPOOL).exists() \
            else {}
        for name, want in expected.items():
            if name not in got:
                self.problem(f"{name}: accepted but missing from the restore")
            elif got[name] != want:
                self.problem(f"{name}: restored {got[name][0]} bytes that differ from the "
                             f"{want[0]} dropped")
            else:
                mtime = (out / site.site_id / SPOOL / name).stat().st_mtime_ns
                if mtime != self.dropped[name].mtime_ns:
                    self.problem(f"{name}: restored mtime {mtime}, dropped "
                                 f"{self.dropped[name].mtime_ns}")
        for name in set(got) - set(expected):
            self.problem(f"{name}: restored but never dropped")


def _blake3(data: bytes) -> str:
    return crypto.content_hash(data)


def _restorer(site: Site) -> Restorer:
    return Restorer(open_backend(site.backend_url), load_recipient_private(site.recipient_key),
                    site_key_loader(site.recipient_key.parent))


async def _cloud_checks(site: Site, out: Path) -> tuple[list[str], RestoreReport,
                                                        RestoreReport]:
    """Names of every manifest of this spool, then a restore into `out`, then a verify."""
    listing = RestoreReport()
    manifests = await _restorer(site).load_manifests(site.site_id, None, listing)
    names = [e.name if e else m.name for m in manifests if m.source == SPOOL
             for e in (m.entries or (None,))]
    restore = await _restorer(site).run(out, [site.site_id])
    restore.problems[:0] = listing.problems
    verify = await _restorer(site).run(None, [site.site_id])
    return names, restore, verify


def run_trial(index: int, workdir: Path, seed: int, cfg: TrialConfig | None = None,
              keep: bool = False) -> TrialResult:
    """One trial on a fresh site under workdir; its folder is removed unless it failed."""
    cfg = cfg or TrialConfig()
    root = workdir / f"trial-{index:04d}"
    if root.exists():
        shutil.rmtree(root)
    start = time.monotonic()
    trial = _Trial(index, root, random.Random(f"{seed}/{index}"), cfg)
    try:
        result = trial.run()
    except Exception as e:  # a harness error is a failed trial, with its reason
        result = trial.result
        result.problems.append(f"trial raised {type(e).__name__}: {e}")
    finally:
        trial.site.close()
    result.seconds = time.monotonic() - start
    if result.ok and not result.hung_stops and not keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        result.root = root
    return result


def run_trials(n: int, workdir: Path, seed: int = 0, *, cfg: TrialConfig | None = None,
               jobs: int = 1, keep: bool = False,
               on_result: Callable[[TrialResult], None] | None = None) -> TrialsSummary:
    """Run `n` crash trials (in `jobs` parallel threads) and summarise them."""
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: list[TrialResult] = []

    def one(i: int) -> TrialResult:
        r = run_trial(i, workdir, seed, cfg, keep)
        if on_result is not None:
            on_result(r)
        return r

    if jobs <= 1:
        results = [one(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(one, range(n)))
    return TrialsSummary(sorted(results, key=lambda r: r.index), time.monotonic() - start, seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.crash_trials", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--jobs", type=int, default=1, help="trials run in parallel")
    ap.add_argument("--max-delay-ms", type=float, default=TrialConfig.max_delay_ms,
                    help="kills land uniformly in 0..this after the daemon is up")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where trial sites go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the sites of passing trials too")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per trial")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    cfg = TrialConfig(max_delay_ms=args.max_delay_ms)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="skyferry-crash-"))

    def show(r: TrialResult) -> None:
        if args.verbose or not r.ok or r.hung_stops:
            print(r.describe(), flush=True)

    summary = run_trials(args.trials, workdir, seed, cfg=cfg, jobs=args.jobs, keep=args.keep,
                         on_result=show)
    print(summary.line(), flush=True)
    if args.workdir is None and not summary.failures and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
