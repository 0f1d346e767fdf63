"""Spool folders: a file is ingested once complete, then deleted or moved to done/."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from agent.errors import DiskFullError, QuotaExceededError, SkyferryError, SourceError
from agent.pipeline import IngestRequest, IngestResult
from agent.settings import ChunkingSettings, SpoolSettings
from agent.sources import Ingest, IngestPack
from agent.sources.spool_scan import Candidate, plan, scan
from agent.telemetry.logs import log_event

log = logging.getLogger("skyferry.spool")
# While the store refuses (quota or disk full) scans back off, doubling up to this.
REFUSED_BACKOFF_MAX_S = 5.0


class SpoolSource:
    def __init__(self, settings: SpoolSettings, ingest: Ingest,
                 ingest_pack: IngestPack | None = None, chunking: ChunkingSettings | None = None,
                 workers: int = 2) -> None:
        self.settings = settings
        self.ingest = ingest
        self.ingest_pack = ingest_pack
        self.chunking = chunking if ingest_pack is not None else None
        self.workers = max(1, workers)
        self._stable_since: dict[str, tuple[int, int, float]] = {}
        self._refused_logged: set[str] = set()  # refusal kinds logged this episode
        self._refused_since: float | None = None
        self._backoff_s = 0.0
        # Files that failed for a reason retrying cannot fix (bad name, not a regular file):
        # skipped until they change, so the log is not flooded every scan.
        self._failed: dict[str, tuple[int, int]] = {}
        self.accepted = 0
        self.ready_bytes = 0  # settled and not yet ingested (the compression policy asks)

    @property
    def done_dir(self) -> Path | None:
        return self.settings.effective_done_dir if self.settings.after == "move" else None

    async def run(self) -> None:
        self.settings.path.mkdir(parents=True, exist_ok=True)
        while True:
            await self.scan_once()
            await asyncio.sleep(max(self.settings.scan_interval_s, self._backoff_s))

    async def scan_once(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        candidates = await asyncio.to_thread(scan, self.settings.path, self.done_dir)
        seen: dict[str, tuple[int, int, float]] = {}
        for c in candidates:
            prev = self._stable_since.get(c.name)
            since = prev[2] if prev and prev[:2] == (c.size, c.mtime_ns) else now
            seen[c.name] = (c.size, c.mtime_ns, since)
        self._stable_since = seen
        ready = [c for c in candidates
                 if now - seen[c.name][2] >= self.settings.settle_s
                 and self._failed.get(c.name) != (c.size, c.mtime_ns)]
        batches = plan(ready, self.chunking)
        self.ready_bytes = sum(c.size for c in ready)
        # Up to `workers` ingests at once (hashing, compression and encryption release the
        # GIL); a quota refusal stops the pass: the next one retries.
        full = asyncio.Event()
        slots = asyncio.Semaphore(self.workers)

        async def one(batch: list[Candidate]) -> None:
            try:
                packed = self.chunking is not None and batch[0].size < self.chunking.pack_below
                ok = await (self._ingest_pack(batch) if packed else self._ingest_one(batch[0]))
                if not ok:
                    full.set()
            finally:
                self.ready_bytes -= sum(c.size for c in batch)
                slots.release()

        async with asyncio.TaskGroup() as tg:
            for batch in batches:
                await slots.acquire()  # started in order, oldest first
                if full.is_set():
                    slots.release()
                    break
                tg.create_task(one(batch))
        if not full.is_set():  # a pass with nothing refused ends a refusal episode
            self._refusals_over()

    def _refusals_over(self) -> None:
        if self._refused_since is None:
            return
        took = time.monotonic() - self._refused_since
        log_event(log, logging.INFO, "ingest_resumed",
                  f"spool {self.settings.name}: nothing refused any more after {took:.1f}s of "
                  f"refusals ({', '.join(sorted(self._refused_logged))})",
                  source=self.settings.name, refused_s=took)
        self._refused_logged.clear()
        self._refused_since = None
        self._backoff_s = 0.0

    def _refused(self, name: str, e: QuotaExceededError) -> None:
        # Logged once per episode (again only if the reason changes, quota vs disk), not per
        # file and scan: a full disk can last hours.
        kind = "disk_full" if isinstance(e, DiskFullError) else "quota"
        if self._refused_since is None:
            self._refused_since = time.monotonic()
        self._backoff_s = min(REFUSED_BACKOFF_MAX_S,
                              max(self.settings.scan_interval_s, 2 * self._backoff_s))
        if kind not in self._refused_logged:
            self._refused_logged.add(kind)
            log_event(log, logging.WARNING, "ingest_refused",
                      f"spool {self.settings.name}: {name} stays in place: {e} (retried every "
                      f"{REFUSED_BACKOFF_MAX_S:g}s at most; not logged again until nothing is "
                      "refused)",
                      source=self.settings.name, file=name, reason=kind)
        else:  # for diagnosis only: where the disk ran out (pre-check, staging, index)
            log_event(log, logging.DEBUG, "ingest_refused_again", f"{name}: {e}",
                      source=self.settings.name, file=name, reason=kind)

    def _source_failed(self, c: Candidate, e: SourceError) -> None:
        self._failed[c.name] = (c.size, c.mtime_ns)
        log_event(log, logging.WARNING, "ingest_failed",
                  f"{e} (skipped until the file changes)", source=self.settings.name,
                  file=c.name)

    async def _ingest_one(self, c: Candidate) -> bool:
        req = IngestRequest(c.path, self.settings.name, c.name, self.settings.priority)
        try:
            result = await self.ingest(req)
        except QuotaExceededError as e:
            self._refused(c.name, e)
            return False
        except SourceError as e:
            self._source_failed(c, e)
            return True
        except SkyferryError as e:  # e.g. the store: worth retrying on the next scan
            log_event(log, logging.WARNING, "ingest_failed", str(e), source=self.settings.name,
                      file=c.name)
            return True
        await self._accepted([(c, result)])
        return True

    async def _ingest_pack(self, batch: list[Candidate]) -> bool:
        assert self.ingest_pack is not None
        reqs = [IngestRequest(c.path, self.settings.name, c.name, self.settings.priority)
                for c in batch]
        try:
            result = await self.ingest_pack(reqs)
        except QuotaExceededError as e:
            self._refused(f"{batch[0].name} and {len(batch) - 1} more small files", e)
            return False
        except SkyferryError as e:  # e.g. the store: worth retrying on the next scan
            log_event(log, logging.WARNING, "ingest_failed", str(e), source=self.settings.name,
                      files=len(batch))
            return True
        by_name = {c.name: c for c in batch}
        for name, err in result.failed.items():
            self._source_failed(by_name[name], err)
        await self._accepted([(by_name[n], r) for n, r in result.accepted.items()])
        return True

    async def _accepted(self, done: list[tuple[Candidate, IngestResult]]) -> None:
        """Only now, after the store committed them, may the producer's copies go."""
        await asyncio.to_thread(self._dispose_all, [c for c, _ in done])
        if done:
            self._backoff_s = 0.0  # progress: space is coming back, retry promptly
        for c, result in done:
            self._failed.pop(c.name, None)
            self._stable_since.pop(c.name, None)
            self.accepted += 1
            log_event(log, logging.INFO, "file_accepted",
                      f"{self.settings.name}/{c.name} accepted", source=self.settings.name,
                      file=c.name, object=result.object_id, bytes=result.size,
                      duplicate=result.duplicate_of is not None)

    def _dispose_all(self, done: list[Candidate]) -> None:
        for c in done:
            self._dispose(c)

    def _dispose(self, c: Candidate) -> None:
        if self.settings.after == "delete":
            c.path.unlink(missing_ok=True)
            return
        assert self.done_dir is not None
        dest = self.done_dir / c.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(c.path, dest)
