"""`skyferry land` worker processes on a shared work queue, for tests and benchmarks.

Each worker is the real CLI (`python -m agent land -c FILE`) in its own session, its JSON log
lines in a file of its own; `kill` is SIGKILL (nothing runs in the worker after it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.backends.protocol import Backend
from tests.kits.restore import ROOT, Cloud
from tests.kits.site import render_toml

LEASE_S = 3.0
BIG = 9 * 2**20 + 77  # above the 8 MiB part size: a multipart upload


def land_config(path: Path, source: dict[str, Any], dest: dict[str, Any], key: Path,
                work_dir: Path, queue: dict[str, Any] | None = None,
                lease_s: float = LEASE_S, **land: Any) -> Path:
    tables: dict[str, Any] = {"source": source, "dest": dest,
                              "land": {"key": str(key), "poll": "200ms", "backfill": "2s",
                                       "work_dir": str(work_dir), **land}}
    if queue is not None:
        tables["queue"] = {**queue, "lease": f"{lease_s:g}s", "max_receives": 10}
    path.write_text(render_toml(tables))
    return path


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


@dataclass
class Workers:
    """`skyferry land -c cfg` processes; `kill` one with SIGKILL, `start` another."""

    cfg: Path
    logs: Path
    all: list[Worker] = field(default_factory=list)
    kills: int = 0
    stopped: list[Worker] = field(default_factory=list)

    def start(self, n: int = 1) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            log = self.logs / f"worker-{len(self.all)}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "agent", "land", "-c", str(self.cfg)], cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True)
            self.all.append(Worker(proc, log))

    @property
    def live(self) -> list[Worker]:
        return [w for w in self.all if w.proc.poll() is None]

    def kill(self, w: Worker) -> None:
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait(10)
        self.kills += 1

    def stop(self) -> None:
        for w in self.live:
            self.stopped.append(w)
            w.proc.send_signal(signal.SIGTERM)
        for w in self.all:
            try:
                w.proc.wait(15)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(10)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        """Until some worker has logged `event` (e.g. "land_backfill": a lister has listed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.failures():
            if any(e.get("event") == event for w in self.all for e in w.lines()):
                return
            time.sleep(0.05)
        raise AssertionError(f"no worker logged {event} within {timeout} s\n{self.failures()}")

    def failures(self) -> str:
        """The log of every worker that exited by itself (not killed, not stopped).

        A worker that `stop` sent SIGTERM may die of it with no log at all: one started just
        before, still importing, has no handler yet (seen under a loaded CI run).
        """
        bad = [w for w in self.all if w.proc.returncode not in (None, 0, -signal.SIGKILL)
               and not (w in self.stopped and w.proc.returncode == -signal.SIGTERM)]
        return "\n".join(w.log.read_text(errors="replace")[-3000:] for w in bad)


def listing(b: Backend, prefix: str = "") -> dict[str, int]:

    async def go() -> dict[str, int]:
        return {i.key: i.size async for i in b.list(prefix)}

    return asyncio.run(go())


def wait_landed(b: Backend, manifests: int, workers: Workers, timeout: float) -> None:
    """Until `manifests` landing records exist and no pending marker is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not workers.failures():
        records = listing(b, "_skyferry/landed/")
        if len(records) >= manifests and not listing(b, "_skyferry/pending/"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{len(records)} of {manifests} manifests landed after {timeout} s; "
                         f"pending: {sorted(listing(b, '_skyferry/pending/'))[:5]}\n"
                         f"{workers.failures()}")


def event_keys(b: Backend) -> Counter[str]:
    """How many events each landed key has, across every events object."""

    async def go() -> Counter[str]:
        out: Counter[str] = Counter()
        async for i in b.list("_skyferry/events/"):
            for line in (await b.get(i.key)).decode().splitlines():
                out[json.loads(line)["key"]] += 1
        return out

    return asyncio.run(go())


def publish_corpus(cloud: Cloud, singles: int, rng: random.Random) -> tuple[dict[str, bytes],
                                                                            list[str]]:
    """Single files, packs and a multipart-sized file: (dest key -> bytes, manifest keys)."""
    want: dict[str, bytes] = {}
    keys: list[str] = []
    site = cloud.site
    for i in range(singles):
        data = rng.randbytes(rng.randrange(1, 3000))
        keys.append(cloud.publish(f"s/{i:03d}.bin", data).key)
        want[f"{site}/files/s/{i:03d}.bin"] = data
    for p in range(3):
        files = [(f"pack{p}/ünï-{j}.txt", rng.randbytes(200 + j)) for j in range(4)]
        keys.append(cloud.publish_pack(files).key)
        want.update({f"{site}/files/{n}": d for n, d in files})
    for b in range(1):
        data = rng.randbytes(BIG + b)
        keys.append(cloud.publish(f"big/{b}.bin", data).key)
        want[f"{site}/files/big/{b}.bin"] = data
    return want, keys


class Watcher(threading.Thread):
    """A lister beside the workers: every data object it ever sees has its final size (a
    partial object would not), and its metadata names the content's hash."""

    def __init__(self, dest: Backend, want: dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self.dest, self.want = dest, want
        self.sizes = {k: len(v) for k, v in want.items()}
        self.done = threading.Event()
        self.polls = 0
        self.seen: set[str] = set()
        self.bad: list[str] = []

    def run(self) -> None:
        asyncio.run(self._watch())

    async def _watch(self) -> None:

        hashes = {k: hashlib.sha256(v).hexdigest() for k, v in self.want.items()}
        while not self.done.is_set():
            async for i in self.dest.list(""):
                if i.key.startswith("_skyferry/"):
                    continue
                if self.sizes.get(i.key) != i.size:
                    self.bad.append(f"{i.key}: listed with {i.size} bytes")
                elif i.key not in self.seen:
                    held = await self.dest.head(i.key)
                    if held is not None and held[1].get("sha256") != hashes[i.key]:
                        self.bad.append(f"{i.key}: metadata {held[1]}")
                    self.seen.add(i.key)
            self.polls += 1
            await asyncio.sleep(0.02)


def holding(workers: Workers) -> list[Any]:
    """Live workers whose last log line says they received a message (they hold its lease)."""
    out = []
    for w in workers.live:
        lines = [e for e in w.lines() if e.get("event") in ("land_received",
                                                            "land_message_done")]
        if lines and lines[-1]["event"] == "land_received":
            out.append(w)
    return out


def takeovers(workers: Workers) -> list[float]:
    """For each message a killed worker held: seconds from its receive there to the next
    receive of the same message by another worker."""
    received: list[tuple[datetime, str, int]] = []  # (when, message id, worker)
    held_at_kill: list[tuple[datetime, str, int]] = []
    for n, w in enumerate(workers.all):
        mine = [(datetime.fromisoformat(e["ts"]), e["event"], str(e["object"]))
                for e in w.lines() if e.get("event") in ("land_received", "land_message_done")]
        received += [(ts, mid, n) for ts, ev, mid in mine if ev == "land_received"]
        if w.proc.returncode == -9 and mine and mine[-1][1] == "land_received":
            held_at_kill.append((mine[-1][0], mine[-1][2], n))
    gaps = []
    for ts, mid, n in held_at_kill:
        later = [t for t, m, k in received if m == mid and k != n and t > ts]
        if later:
            gaps.append((min(later) - ts).total_seconds())
    return gaps
