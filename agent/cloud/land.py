"""`skyferry land`: sealed objects become plain files (with metadata) in any backend.

One worker, listing discovery (agent/cloud/land_discover.py). Per manifest: read and check it
(`CloudReader`: signature, the site's history), stage the files that are newer than what landed
under their names (agent/cloud/land_stage.py), put each with `put_plain`, then create the landing
record; the worker that creates it writes that manifest's events. What fails verification is
quarantined with a report naming it and why, and the rest carries on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.backends.protocol import Backend, ObjectInfo
from agent.backends.retry import retrying
from agent.cloud import land_book as book
from agent.cloud.history import History
from agent.cloud.land_discover import Discovery
from agent.cloud.land_recover import recover_events
from agent.cloud.land_stage import Staged, stage
from agent.cloud.restore_progress import Progress
from agent.cloud.restore_read import DECODE_ERRORS, CloudReader, Problem, SiteKeys
from agent.errors import ObjectNotFoundError, SkyferryError
from agent.format.manifest import Manifest, uuid7

log = logging.getLogger("skyferry.land")


class LandError(SkyferryError):
    """The destination refused what was landed (an operational error, not a bad object)."""


@dataclass
class LandReport:
    manifests: int = 0
    files: int = 0
    bytes: int = 0
    superseded: int = 0
    quarantined: list[Problem] = field(default_factory=list)


def worker_name() -> str:
    """Unique per process: event objects are create-only, one name per worker and batch."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    return f"{host or 'lander'}-{secrets.token_hex(4)}"


class Lander(CloudReader):
    """Lands a source store's sealed objects into a destination backend."""

    def __init__(self, source: Backend, dest: Backend, recipient: X25519PrivateKey,
                 site_keys: SiteKeys, work_dir: Path, parallel: int = 8,
                 worker: str | None = None) -> None:
        super().__init__(source, recipient, site_keys, parallel)
        self.dest = dest
        self.work_dir = work_dir
        self.worker = worker or worker_name()
        self.discovery = Discovery(source, dest)
        self._batches = 0
        self.progress: Progress | None = None  # manifests done and bytes verified, on a terminal

    async def land_once(self, report: LandReport | None = None,
                        show_progress: bool | None = False) -> LandReport:
        """A backfill listing, and everything it found landed or quarantined."""
        report = report or LandReport()
        self.history = History()
        await recover_events(self.dest)
        found = await self.discovery.backfill()
        self.progress = Progress(sum(len(i) for _, i in found), 0, enabled=show_progress)
        try:
            for site, infos in found:
                await self._land_site(site, infos, report)
        finally:
            self.progress.close()
            self.progress = None
        return report

    async def run(self, poll_s: float, backfill_s: float) -> None:
        """Land until cancelled: a backfill now and every `backfill_s`, polls in between."""
        loop = asyncio.get_running_loop()
        while True:
            report = await self.land_once()
            _log_report(report)
            next_backfill = loop.time() + backfill_s
            while loop.time() < next_backfill:
                await asyncio.sleep(poll_s)
                report = LandReport()
                for site, infos in await self.discovery.poll():
                    await self._land_site(site, infos, report)
                if report.manifests:
                    _log_report(report)

    async def _land_site(self, site: str, infos: list[ObjectInfo], report: LandReport) -> None:
        """The history checks that apply to one manifest at a time (`History.observe`: a
        manifest replayed or moved to another date folder is quarantined). Gaps in a site's
        numbered history are `skyferry verify`'s to report: a pass here sees only what is new."""
        for info in sorted(infos, key=lambda i: i.key):
            await self.land_manifest(info, report)

    async def land_manifest(self, info: ObjectInfo, report: LandReport) -> None:
        """Land one sealed manifest's files, or quarantine it; never both for one file."""
        report.manifests += 1
        try:
            await self._land_manifest(info, report)
        finally:
            if self.progress is not None:
                self.progress.advance(0, 1)

    async def _land_manifest(self, info: ObjectInfo, report: LandReport) -> None:
        try:
            m, cost = await self._load_counted(info)
        except DECODE_ERRORS as e:
            self.history.unreadable(info.key.split("/", 1)[0], info.key)
            await self._quarantine(info.key, str(e), {}, report)
            return
        self._manifest_budget.give(cost)  # one manifest at a time: held, not budgeted
        if self.progress is not None:
            self.progress.total_bytes += m.size
        replayed = self.history.observe(info.key, m)
        if replayed is not None:
            await self._quarantine(info.key, replayed, {}, report)
            return
        if await retrying(lambda: self.dest.size(book.landed_key(m.site, m.object_id))) \
                is not None:
            return  # landed by an earlier run (or another worker) meanwhile
        wanted, superseded = await self._newer_than_landed(m)
        staged = await stage(self, m, wanted, self.work_dir, self.progress) if wanted else None
        try:
            landed = await self._put_all(m, staged.files if staged else [])
        finally:
            if staged is not None:
                staged.cleanup()
        report.superseded += len(superseded)
        if staged is not None and (staged.failure or staged.bad):
            await self._quarantine(info.key, staged.failure or "files did not verify",
                                   staged.bad, report)
        if staged is not None and staged.failure and not staged.bad and not landed:
            return  # nothing of it verified: the quarantine report says why
        await self._record(info.key, m, landed, superseded, report)

    async def _newer_than_landed(self, m: Manifest) -> tuple[set[int], list[str]]:
        """The files of `m` newer than the version landed under their names (entry indexes,
        -1 for the whole object), and the names an already landed newer version keeps."""
        wanted: set[int] = set()
        superseded: list[str] = []
        names = [(i, e.name) for i, e in enumerate(m.entries)] or [(-1, m.name)]
        for i, name in names:
            landed = await self._landed_version(m, name)
            # The same version again (a run that stopped before its landing record) lands again.
            if landed is not None and landed.newer_than(book.Version.of(m, i)):
                superseded.append(name)
            else:
                wanted.add(i)
        return wanted, superseded

    async def _landed_version(self, m: Manifest, name: str) -> book.Version | None:
        key = book.name_key(m.site, "/".join(book.dest_parts(m, name)[1:]))
        try:
            blob = await retrying(lambda: self.dest.get(key, max_size=1 << 16))
        except ObjectNotFoundError:
            return None
        return book.Version.from_json(blob)

    async def _put_all(self, m: Manifest, files: list[Staged]) -> list[book.Landed]:
        out = []
        for f in files:
            key = "/".join(f.parts)
            landed = book.Landed(key, f.size, f.sha256, f.mtime_ns, m.site, m.source,
                                 m.object_id, m.created)
            await self._put_one(m, f, landed)
            out.append(landed)
        return out

    async def _put_one(self, m: Manifest, f: Staged, landed: book.Landed) -> None:
        """Put the file, check what the destination holds, then record its version."""
        await retrying(lambda: self.dest.put_plain(landed.key, f.path,
                                                   metadata=landed.metadata(),
                                                   mtime_ns=f.mtime_ns))
        held = await retrying(lambda: self.dest.head(landed.key))
        if held is None or held[0] != f.size or held[1].get("sha256") != f.sha256:
            raise LandError(f"{self.dest.url}: {landed.key} does not hold what was put "
                            f"({held!r}, expected {f.size} bytes, sha256 {f.sha256})")
        name_key = book.name_key(m.site, "/".join(f.parts[1:]))
        version = book.Version.of(m, f.entry).to_json()
        await retrying(lambda: self.dest.put_plain(name_key, version, metadata={}))

    async def _record(self, sealed_key: str, m: Manifest, landed: list[book.Landed],
                      superseded: list[str], report: LandReport) -> None:
        """Create the landing record; the worker that created it writes the events.

        A pending marker is written first and removed last: a crash between the record and its
        events leaves it, and the next backfill writes the events from the record
        (agent/cloud/land_recover.py), so each landed file has exactly one event.
        """
        events = self._next_events_key() if landed else None
        when = book.now_iso()
        lines = [f.event(uuid7(), when) for f in landed]
        record = book.landing_record(sealed_key, landed, superseded, events, lines)
        pending = book.pending_key(m.site, m.object_id, self.worker)
        if events is not None:
            await retrying(lambda: self.dest.put_plain(pending, sealed_key.encode(),
                                                       metadata={}))
        created = await retrying(lambda: self.dest.put_if_absent(
            book.landed_key(m.site, m.object_id), record))
        if created and events is not None:
            await retrying(lambda: self.dest.put_if_absent(events, book.event_lines(lines)))
        if events is not None:
            await retrying(lambda: self.dest.delete(pending))
        if not created:
            return
        for f in landed:
            report.files += 1
            report.bytes += f.size
            log.info("landed %s (%d bytes)", f.key, f.size,
                     extra={"event": "land_file", "object": m.object_id, "bytes": f.size})

    def _next_events_key(self) -> str:
        self._batches += 1
        return book.events_key(datetime.now(UTC).strftime("%Y-%m-%d"), self.worker,
                               self._batches)

    async def _quarantine(self, sealed_key: str, reason: str, files: dict[str, str],
                          report: LandReport) -> None:
        report.quarantined.append(Problem(sealed_key, reason))
        log.warning("quarantined %s: %s", sealed_key, reason,
                    extra={"event": "land_quarantined", "object": sealed_key})
        await retrying(lambda: self.dest.put_if_absent(
            book.quarantine_key(sealed_key), book.quarantine_report(sealed_key, reason, files)))


def _log_report(report: LandReport) -> None:
    log.info("landed %d files (%d bytes) from %d manifests; %d quarantined",
             report.files, report.bytes, report.manifests, len(report.quarantined),
             extra={"event": "land_pass"})
