"""Spool folders: a file is ingested once complete, then deleted or moved to done/.

Every problem with one file stays with that file: it is logged once (one line per path and
reason, not per scan), counted in skyferry_spool_skipped_total, and left where it is; the
rest of the spool carries on. The folder is read through directory descriptors
(spool_scan.py, spool_files.py), so nothing outside it is ever read, written or deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import resource
from pathlib import Path

from agent.config.settings import ChunkingSettings, SpoolSettings
from agent.errors import QuotaExceededError, SkyferryError, SourceError
from agent.host.blocking import RunBlocking
from agent.ingest.requests import IngestRequest, IngestResult
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.sources import Ingest, IngestPack, spool_lease
from agent.sources.spool_files import Hold, Kept
from agent.sources.spool_report import SpoolReport, log
from agent.sources.spool_root import Pass, SpoolRoot
from agent.sources.spool_scan import (
    Candidate,
    ScanResult,
    plan,
    printable,
    scan_fd,
    scan_names,
)
from agent.sources.spool_watch import Heard, SpoolWatch, open_watch

# Accepted files kept for a reason of their own (a new version, a writer): looked at anew,
# not merely disposed of again.
_KEPT_FOR_NOW = ("changed", "gone", "busy")

Version = tuple[int, int, int, int]  # (inode, size, mtime, ctime): one version of a file


def raise_open_file_limit() -> None:
    """Soft descriptor limit up to the hard one: a pack of up to `pack_files` files holds a
    descriptor per file (its read lease) until the files are deleted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pack_files_cap() -> int:
    """The most files one pack may hold in this process: each holds a descriptor (its read
    lease) until disposed of, the pipeline a second while it reads, and the store, sockets
    and other packs need theirs; a pack beyond the limit failed on EMFILE every pass."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft // 4)


def version(c: Candidate) -> Version:
    assert c.st is not None
    return c.st.st_ino, c.st.st_size, c.st.st_mtime_ns, c.st.st_ctime_ns


class SpoolSource:
    def __init__(self, settings: SpoolSettings, ingest: Ingest,
                 ingest_pack: IngestPack | None = None, chunking: ChunkingSettings | None = None,
                 workers: int = 2, protected: tuple[Path, ...] = (),
                 metrics: Metrics | None = None, state_dir: Path | None = None,
                 run_side: RunBlocking | None = None, watching: bool = True,
                 gather_s: float | None = None) -> None:
        """`run_side`: how scans and disposals leave the loop (default: asyncio's executor).
        `watching`: take what inotify hears finished between scans, files renamed in
        `gather_s` after the first (default `settle`, packed as a scan packs them)."""
        self.settings = settings
        self.run_side: RunBlocking = run_side or asyncio.to_thread
        self.ingest = ingest
        self.ingest_pack = ingest_pack
        self.chunking = chunking if ingest_pack is not None else None
        self.workers = max(1, workers)
        self.metrics = metrics
        self.report = SpoolReport(settings, metrics)
        self.root = SpoolRoot(settings, protected, state_dir, self.report)
        self._stable_since: dict[str, tuple[Version, float]] = {}
        # Files that failed for a reason retrying cannot fix (unreadable, bad name): skipped
        # until they change, so the log is not flooded every scan.
        self._failed: dict[str, Version] = {}
        # Accepted, but could not be deleted or moved: not ingested again while unchanged;
        # their disposal is retried every pass.
        self._kept: dict[str, Candidate] = {}
        self.accepted = 0
        self.ready_bytes = 0  # settled and not yet ingested (the compression policy asks)
        self.watching = watching
        self.gather_s = settings.settle_s if gather_s is None else gather_s
        self._watch: SpoolWatch | None = None

    @property
    def done_dir(self) -> Path | None:
        return self.settings.effective_done_dir if self.settings.after == "move" else None

    async def run(self) -> None:
        """A full scan every scan_interval; between scans, what inotify heard."""
        raise_open_file_limit()
        loop = asyncio.get_running_loop()
        if self.watching:
            self._watch = open_watch(self.settings.name, str(self.settings.path),
                                     self.settings.settle_s, self.gather_s)
        try:
            next_scan = loop.time()
            while True:
                heard = Heard(rescan=loop.time() >= next_scan)
                if self._watch is not None and not heard.rescan:
                    heard = await self._watch.wait(next_scan - loop.time())
                elif not heard.rescan:
                    await asyncio.sleep(next_scan - loop.time())
                    continue
                try:
                    if heard.rescan:
                        await self.scan_once()
                    if heard.names:
                        await self.take_named(heard.names)
                except Exception as e:  # the daemon never stops for a spool: log, retry
                    self.report.unexpected(e)
                if heard.rescan:
                    next_scan = loop.time() + max(self.settings.scan_interval_s,
                                                  self.report.backoff_s)
        finally:
            if self._watch is not None:
                self._watch.close()

    # ---- one pass ------------------------------------------------------------------------

    async def scan_once(self) -> None:
        # A writer opening a leased file sends SIGIO, whose default action ends the process:
        # leases are taken only once a handler is in place (the event loop's thread is the
        # main thread in the daemon; elsewhere leases are not used).
        spool_lease.install_sigio_handler()
        p = await self.run_side(self.root.open_pass)
        if p is None:
            return
        try:
            fence = self.root.fence(p)
            # Watched before the scan: nothing added meanwhile is missed.
            if self._watch is not None and not await self._watch.watch_folders(
                    self.run_side, p.root_fd, fence):
                self._watch = None
            result = await self.run_side(scan_fd, p.root_fd, self.settings.path, fence)
            self._forget_gone(result)
            for s in result.skipped:
                self.report.tell(s.name, s.reason, s.why)
            if result.asides:
                await self.run_side(self.root.take_back, p, result.asides)
            await self._ingest_ready(p, await self._retry_kept(p, result.files))
        finally:
            p.close()

    async def take_named(self, names: set[str]) -> None:
        """Files inotify heard finished (spool_watch.py), looked at as a scan looks at them
        and taken without waiting for the next scan (a read lease still refuses one open)."""
        p = await self.run_side(self.root.open_pass)
        if p is None:
            return
        try:
            result = await self.run_side(scan_names, p.root_fd, self.settings.path,
                                         self.root.fence(p), names)
            for s in result.skipped:
                self.report.tell(s.name, s.reason, s.why)
            await self._ingest_ready(p, await self._retry_kept(p, result.files), heard=True)
        finally:
            p.close()

    def _forget_gone(self, result: ScanResult) -> None:
        """A path that went away is logged again should it come back with a problem."""
        here = ({c.name for c in result.files} | {s.name for s in result.skipped}
                | set(result.asides))
        here.add(".")
        here.add(self.root.done_name())
        for table in (self.report.told, self._failed, self._kept):
            for name in [n for n in table if n not in here]:
                del table[name]

    async def _retry_kept(self, p: Pass, files: list[Candidate]) -> list[Candidate]:
        """Files accepted earlier but not yet deleted or moved: try again, once per pass;
        what remains is what the scan found that may need ingesting."""
        retry = [c for c in files
                 if c.name in self._kept and version(self._kept[c.name]) == version(c)]
        for c in files:
            if c.name in self._kept and c not in retry:
                del self._kept[c.name]  # changed since it was accepted: a new version
        if retry:
            await self.run_side(self._dispose_again, p, retry)
        return [c for c in files if c not in retry]

    def _dispose_again(self, p: Pass, retry: list[Candidate]) -> None:
        for c in retry:
            hold = Hold(p.root_fd, c)
            try:
                p.dispose(c, hold)  # takes the lease first: no writer may have it open
            except (Kept, OSError):
                continue
            finally:
                hold.close()
            del self._kept[c.name]
            self.report.told.pop(c.name, None)
            log_event(log, logging.INFO, "file_disposed",
                      f"{self.settings.name}/{printable(c.name)} accepted earlier, now "
                      f"{'moved' if p.move else 'deleted'}", source=self.settings.name,
                      file=printable(c.name))

    async def _ingest_ready(self, p: Pass, candidates: list[Candidate],
                            heard: bool = False) -> None:
        """`heard`: only the files inotify named, settled already (`take_named`); else every
        file the scan found, each taken once unchanged for `settle`."""
        now = asyncio.get_running_loop().time()
        seen: dict[str, tuple[Version, float]] = {}
        for c in candidates:
            prev = self._stable_since.get(c.name)
            since = prev[1] if prev and prev[0] == version(c) else now
            seen[c.name] = (version(c), now - self.settings.settle_s if heard else since)
        if heard:
            self._stable_since.update(seen)
        else:
            self._stable_since = seen
        ready = [c for c in candidates
                 if now - seen[c.name][1] >= self.settings.settle_s
                 and self._failed.get(c.name) != version(c)]
        chunking = self.chunking
        if chunking is not None and chunking.pack_files > pack_files_cap():
            chunking = dataclasses.replace(chunking, pack_files=pack_files_cap())
        batches = plan(ready, chunking)
        self.ready_bytes = (self.ready_bytes if heard else 0) + sum(c.size for c in ready)
        # Up to `workers` ingests at once (hashing, compression and encryption release the
        # GIL); a quota refusal stops the pass: the next one retries.
        full = asyncio.Event()
        slots = asyncio.Semaphore(self.workers)

        async def one(batch: list[Candidate]) -> None:
            try:
                packed = self.chunking is not None and batch[0].size < self.chunking.pack_below
                ok = await (self._ingest_pack(p, batch) if packed
                            else self._ingest_one(p, batch[0]))
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
            self.report.refusals_over()

    # ---- ingest ------------------------------------------------------------------------------

    def _request(self, c: Candidate, hold: Hold) -> IngestRequest:
        return IngestRequest(c.path, self.settings.name, c.name, self.settings.priority,
                             opener=hold.open, seen=c.st)

    def _source_failed(self, c: Candidate, hold: Hold, e: Exception) -> None:
        if self.report.not_taken(c.name, hold.busy, hold.open_errno, e):
            self._stable_since.pop(c.name, None)  # not settled after all: settle starts again
        else:
            self._failed[c.name] = version(c)  # tried again once it changes

    async def _ingest_one(self, p: Pass, c: Candidate) -> bool:
        hold = Hold(p.root_fd, c)
        try:
            try:
                result = await self.ingest(self._request(c, hold))
            except QuotaExceededError as e:
                self.report.refused(c.name, e)
                return False
            except (SourceError, OSError) as e:
                self._source_failed(c, hold, e)
                return True
            except SkyferryError as e:  # e.g. the store: worth retrying on the next scan
                log_event(log, logging.WARNING, "ingest_failed", printable(str(e)),
                          source=self.settings.name, file=printable(c.name))
                return True
            await self._accepted(p, [(c, hold, result)])
            return True
        finally:
            hold.close()

    async def _ingest_pack(self, p: Pass, batch: list[Candidate]) -> bool:
        assert self.ingest_pack is not None
        holds = {c.name: Hold(p.root_fd, c) for c in batch}
        try:
            try:
                result = await self.ingest_pack([self._request(c, holds[c.name])
                                                 for c in batch])
            except QuotaExceededError as e:
                self.report.refused(f"{batch[0].name} and {len(batch) - 1} more small files", e)
                return False
            except (SkyferryError, OSError) as e:  # e.g. the store: retried on the next scan
                log_event(log, logging.WARNING, "ingest_failed", printable(str(e)),
                          source=self.settings.name, files=len(batch))
                return True
            by_name = {c.name: c for c in batch}
            for name, err in result.failed.items():
                self._source_failed(by_name[name], holds[name], err)
            await self._accepted(p, [(by_name[n], holds[n], r)
                                     for n, r in result.accepted.items()])
            return True
        finally:
            for hold in holds.values():
                hold.close()

    async def _accepted(self, p: Pass, done: list[tuple[Candidate, Hold, IngestResult]]
                        ) -> None:
        """Only now, after the store committed them, may the producer's copies go."""
        kept = await self.run_side(self._dispose_all, p, [(c, h) for c, h, _ in done])
        if done:
            self.report.backoff_s = 0.0  # progress: space is coming back, retry promptly
        for c, _, result in done:
            self._failed.pop(c.name, None)
            self._stable_since.pop(c.name, None)
            self.accepted += 1
            log_event(log, logging.INFO, "file_accepted",
                      f"{self.settings.name}/{printable(c.name)} accepted",
                      source=self.settings.name, file=printable(c.name),
                      object=result.object_id, bytes=result.size,
                      duplicate=result.duplicate_of is not None)
            k = kept.get(c.name)
            if k is not None:
                self.report.tell(c.name, k.reason, str(k), logging.INFO
                                 if k.reason in _KEPT_FOR_NOW else logging.WARNING)

    def _dispose_all(self, p: Pass, done: list[tuple[Candidate, Hold]]) -> dict[str, Kept]:
        kept: dict[str, Kept] = {}
        for c, hold in done:
            try:
                p.dispose(c, hold)
            except Kept as k:
                kept[c.name] = k
                if k.reason not in _KEPT_FOR_NOW:
                    self._kept[c.name] = c  # the same version is not ingested again
            except OSError as e:
                kept[c.name] = Kept("not_disposed", f"cannot be disposed of: {e.strerror}")
                self._kept[c.name] = c
            finally:
                hold.close()
        return kept
