"""`skyferry land` on a work queue, side by side: one worker, then four workers killed with
SIGKILL at random while they land, on the same corpus (a fresh bucket and queue pair each).

Both runs are real `skyferry land -c FILE` processes on moto's S3 + SQS (or Azurite's blob and
queue services). Reported: wall time and manifests/s of each, the ratio, the kills, how long a
killed worker's message waited before another worker took it (its lease), and the checks the
test suite makes (tests/system/test_land_queue.py) at a larger scale: every file landed
byte-identical with exactly one event, and a lister running beside the workers never saw a
partial object.

Usage: python -m benchmarks.land_queue [--manifests 300] [--kills 40] [--service moto]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.run import publish
from tests.kits.emulators import (
    Emulator,
    new_cloud,
    new_queues,
    start_azurite,
    start_azurite_queue,
    start_moto,
)
from tests.kits.landq import (
    LEASE_S,
    Watcher,
    Workers,
    event_keys,
    holding,
    land_config,
    listing,
    publish_corpus,
    takeovers,
    wait_landed,
)
from tests.kits.restore import Cloud, make_keys


@dataclass
class Run:
    workers: int
    kills: int
    seconds: float = 0.0
    manifests: int = 0
    files: int = 0
    exactly_once: bool = False
    byte_identical: bool = False
    partial_views: list[str] = field(default_factory=list)
    lister_polls: int = 0
    takeover_s: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.manifests / self.seconds if self.seconds else 0.0


def land(cloud: Cloud, ems: tuple[Emulator, Emulator], work: Path, want: dict[str, bytes],
         manifests: int, n_workers: int, kills: int, seed: int) -> Run:
    store = new_cloud(work / "dest", ems[0])
    queues = new_queues(work / "queues", ems[1])
    dest = store.backend()
    cfg = land_config(work / "land.toml", {"url": cloud.url}, store.table,
                      cloud.keys.recipient_key, work, queues.table)
    run = Run(n_workers, kills, manifests=manifests, files=len(want))
    workers = Workers(cfg, work / "logs")
    watcher = Watcher(dest, want)
    watcher.start()
    rng = random.Random(seed)
    began = time.monotonic()
    workers.start(n_workers)
    try:
        while workers.kills < kills and len(listing(dest, "_skyferry/landed/")) < manifests:
            time.sleep(rng.uniform(0.1, 0.6))
            busy = holding(workers)
            if busy:
                workers.kill(rng.choice(busy))
                workers.start(1)
        wait_landed(dest, manifests, workers, 600)
        run.seconds = time.monotonic() - began
    finally:
        watcher.done.set()
        watcher.join(10)
        workers.stop()
    run.kills = workers.kills
    run.exactly_once = event_keys(dest) == Counter(want.keys())
    data = {k: v for k, v in listing(dest).items() if not k.startswith("_skyferry/")}
    run.byte_identical = data == {k: len(v) for k, v in want.items()} and all(
        asyncio.run(dest.get(k)) == v for k, v in want.items())
    run.partial_views, run.lister_polls = watcher.bad, watcher.polls
    run.takeover_s = takeovers(workers)
    return run


def render(runs: list[Run], service: str, argv: list[str], seconds: float) -> str:
    one, many = runs
    load = os.getloadavg()[0]
    loaded = " (taken under load: other engineers share the machine)" if (
        load > (os.cpu_count() or 1)) else ""
    rows = "\n".join(
        f"| {r.workers} | {r.kills} | {r.seconds:.1f} | {r.rate:.2f} | "
        f"{'yes' if r.exactly_once else 'NO'} | {'yes' if r.byte_identical else 'NO'} | "
        f"{len(r.partial_views)} in {r.lister_polls} listings | "
        f"{min(r.takeover_s, default=0):.1f}-{max(r.takeover_s, default=0):.1f} s "
        f"({len(r.takeover_s)}) |" for r in runs)
    return (
        f"## Land on a work queue (`python -m benchmarks.land_queue {' '.join(argv)}`)\n\n"
        f"{one.manifests} manifests ({one.files} files: small files, packs, a 9 MiB multipart "
        f"file) landed from a folder into {service} by `skyferry land` workers sharing one "
        f"queue (lease {LEASE_S:g} s), side by side in one run. Measured "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, load average "
        f"{load:.1f} at the end{loaded}; whole run {seconds:.0f} s.\n\n"
        "| workers | kill -9 | wall s | manifests/s | one event per file | byte-identical | "
        "partial objects seen | killed worker's message taken over after |\n"
        "| ---: | ---: | ---: | ---: | --- | --- | --- | --- |\n"
        f"{rows}\n\n"
        f"4 workers with {many.kills} kills vs 1 worker without: {many.rate / one.rate:.2f}x "
        "the manifests per second.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.land_queue",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--manifests", type=int, default=300, help="single-file manifests (300)")
    ap.add_argument("--kills", type=int, default=40, help="kill -9 in the 4-worker run (40)")
    ap.add_argument("--service", choices=("moto", "azurite"), default="moto")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="skyferry-landq-") as tmp:
        work = Path(tmp)
        (work / "em").mkdir()
        if args.service == "moto":
            em = start_moto(work / "em")
            ems: tuple[Emulator, Emulator] = (em, em)
        else:
            ems = (start_azurite(work / "em"), start_azurite_queue(work / "em"))
        try:
            cloud = Cloud(work / "sealed", make_keys(work / "keys"))
            want, keys = publish_corpus(cloud, args.manifests, random.Random(16))
            runs = [land(cloud, ems, work / f"run-{n}", want, len(keys), n, kills, 16)
                    for n, kills in ((1, 0), (4, args.kills))]
        finally:
            for e in ems:
                e.stop()  # twice for moto: a stopped one is left alone
    body = render(runs, args.service, argv if argv is not None else sys.argv[1:],
                  time.monotonic() - began)
    verdicts = [("exactly once", all(r.exactly_once and r.byte_identical for r in runs), ""),
                ("no partial object", not any(r.partial_views for r in runs), ""),
                ("takeover after the lease",
                 min(runs[1].takeover_s, default=LEASE_S) >= LEASE_S - 0.5, "")]
    return publish("land_queue", body, not args.no_write, verdicts)


if __name__ == "__main__":
    sys.exit(main())
