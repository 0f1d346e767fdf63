"""Spool folders: a file is ingested once complete, then deleted or moved to done/."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.errors import QuotaExceededError, SkyferryError, SourceError
from agent.pipeline import IngestRequest
from agent.settings import SpoolSettings
from agent.sources import Ingest
from agent.telemetry.logs import log_event

log = logging.getLogger("skyferry.spool")
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")


def is_temporary(name: str) -> bool:
    """Names producers use while writing; such files are ingested only after the rename."""
    return name.startswith(".") or name.endswith(_TEMP_SUFFIXES)


@dataclass(frozen=True)
class Candidate:
    path: Path
    name: str  # relative to the spool root, POSIX separators
    size: int
    mtime_ns: int


def scan(root: Path, skip: Path | None) -> list[Candidate]:
    """Regular, non-temporary files below root, oldest first."""
    found: list[Candidate] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and (skip is None or here / d != skip)]
        for fn in filenames:
            if is_temporary(fn):
                continue
            p = here / fn
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if not p.is_file() or p.is_symlink():
                continue
            found.append(Candidate(p, p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    found.sort(key=lambda c: c.mtime_ns)
    return found


class SpoolSource:
    def __init__(self, settings: SpoolSettings, ingest: Ingest, clock_s: float = 0.0) -> None:
        self.settings = settings
        self.ingest = ingest
        self._stable_since: dict[str, tuple[int, int, float]] = {}
        self._refused_logged: set[str] = set()
        # Files that failed for a reason retrying cannot fix (bad name, not a regular file):
        # skipped until they change, so the log is not flooded every scan.
        self._failed: dict[str, tuple[int, int]] = {}
        self.accepted = 0

    @property
    def done_dir(self) -> Path | None:
        return self.settings.effective_done_dir if self.settings.after == "move" else None

    async def run(self) -> None:
        self.settings.path.mkdir(parents=True, exist_ok=True)
        while True:
            await self.scan_once()
            await asyncio.sleep(self.settings.scan_interval_s)

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
        for c in candidates:
            if now - seen[c.name][2] < self.settings.settle_s:
                continue
            if self._failed.get(c.name) == (c.size, c.mtime_ns):
                continue
            if not await self._ingest_one(c):
                break  # quota full: stop this pass; the next one retries

    async def _ingest_one(self, c: Candidate) -> bool:
        req = IngestRequest(c.path, self.settings.name, c.name, self.settings.priority)
        try:
            result = await self.ingest(req)
        except QuotaExceededError as e:
            if c.name not in self._refused_logged:
                self._refused_logged.add(c.name)
                log_event(log, logging.WARNING, "ingest_refused",
                          f"spool {self.settings.name}: {c.name} stays in place: {e}",
                          source=self.settings.name, file=c.name)
            return False
        except SourceError as e:
            self._failed[c.name] = (c.size, c.mtime_ns)
            log_event(log, logging.WARNING, "ingest_failed",
                      f"{e} (skipped until the file changes)", source=self.settings.name,
                      file=c.name)
            return True
        except SkyferryError as e:  # e.g. the store: worth retrying on the next scan
            log_event(log, logging.WARNING, "ingest_failed", str(e), source=self.settings.name,
                      file=c.name)
            return True
        self._refused_logged.discard(c.name)
        self._failed.pop(c.name, None)
        await asyncio.to_thread(self._dispose, c)
        self._stable_since.pop(c.name, None)
        self.accepted += 1
        log_event(log, logging.INFO, "file_accepted", f"{self.settings.name}/{c.name} accepted",
                  source=self.settings.name, file=c.name, object=result.object_id,
                  bytes=result.size, duplicate=result.duplicate_of is not None)
        return True

    def _dispose(self, c: Candidate) -> None:
        """Only now, after the store committed it, may the producer's copy go."""
        if self.settings.after == "delete":
            c.path.unlink(missing_ok=True)
            return
        assert self.done_dir is not None
        dest = self.done_dir / c.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(c.path, dest)
