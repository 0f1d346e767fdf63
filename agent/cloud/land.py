"""`skyferry land`: sealed objects become plain files (with metadata) in any backend.

`Lander.run`: one worker alone, listing discovery (agent/cloud/land_discover.py); with a work
queue, any number of workers share the manifests (agent/cloud/land_queue.py), each calling
`land_manifest`. Per manifest: read and check it (`CloudReader`: signature, the site's history),
stage the files that are newer than what landed under their names (agent/cloud/land_stage.py),
put each under its name, newest version winning whatever the concurrency
(agent/cloud/land_put.py), then create the landing record; the worker that creates it writes
that manifest's events. What fails verification is quarantined with a report naming it and why,
and the rest carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.backends.protocol import Backend, ObjectInfo
from agent.backends.retry import retrying
from agent.cloud import land_book as book
from agent.cloud.history import History
from agent.cloud.land_discover import Discovery
from agent.cloud.land_events import Downstream, forget
from agent.cloud.land_metrics import LandMetrics
from agent.cloud.land_names import LandError
from agent.cloud.land_put import Putter
from agent.cloud.land_recover import recover_events
from agent.cloud.land_retention import Retention
from agent.cloud.land_stage import StagingArea, stage
from agent.cloud.restore_progress import Progress
from agent.cloud.restore_read import DECODE_ERRORS, CloudReader, Problem, SiteKeys
from agent.errors import (
    ObjectConflictError,
    PermanentBackendError,
    SkyferryError,
    TransientBackendError,
)
from agent.format.manifest import Manifest, uuid7

log = logging.getLogger("skyferry.land")
MANIFESTS_AHEAD = 8  # manifests of one site landed at once (memory: the manifest budget)


@dataclass
class LandReport:
    manifests: int = 0
    files: int = 0
    bytes: int = 0
    superseded: int = 0
    quarantined: list[Problem] = field(default_factory=list)
    failed: list[Problem] = field(default_factory=list)  # refused by the destination: again later

    def add(self, other: LandReport) -> None:
        self.files += other.files
        self.bytes += other.bytes
        self.superseded += other.superseded
        self.quarantined += other.quarantined
        self.failed += other.failed


def worker_name() -> str:
    """Unique per process: event objects are create-only, one name per worker and batch."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    return f"{host or 'lander'}-{secrets.token_hex(4)}"


class Lander(CloudReader):
    """Lands a source store's sealed objects into a destination backend."""

    def __init__(self, source: Backend, dest: Backend, recipient: X25519PrivateKey,
                 site_keys: SiteKeys, work_dir: Path, parallel: int = 8,
                 worker: str | None = None, downstream: Downstream | None = None) -> None:
        super().__init__(source, recipient, site_keys, parallel)
        self.dest = dest
        self.staging = StagingArea(work_dir)  # this process's folder in work_dir
        self.worker = worker or worker_name()
        self.discovery = Discovery(source, dest)
        self.putter = Putter(self, dest, self.staging)
        self.downstream = downstream  # MQTT / webhook (agent/cloud/land_events.py)
        # Markers of other live workers (a queue): looked at only when this old, removed
        # without a record only when orphan_s old (agent/cloud/land_recover.py).
        self.marker_min_age_s = self.marker_orphan_s = 0.0
        self._batches = 0
        self.progress: Progress | None = None  # manifests done and bytes verified, on a terminal
        self.retention: Retention | None = None  # [retention] agent/cloud/land_retention.py
        self.metrics = LandMetrics()

    async def land_once(self, report: LandReport | None = None,
                        show_progress: bool | None = False) -> LandReport:
        """A backfill listing, and everything it found landed or quarantined."""
        report = report or LandReport()
        self.history = History()
        await self.recover()
        found = await self.discovery.backfill()
        self.progress = Progress(sum(len(i) for _, i in found), 0, enabled=show_progress)
        try:
            for site, infos in found:
                await self._land_site(site, infos, report)
        finally:
            self.progress.close()
            self.progress = None
        if self.retention is not None:  # [retention] after a backfill, from what is durable
            await self.retention.run(self.discovery.sites)
        return report

    async def recover(self) -> int:
        """Write (and post) the events of landings whose writer stopped before it did."""
        return await recover_events(self.dest, self.downstream, self.marker_min_age_s,
                                    self.marker_orphan_s)

    async def run(self, poll_s: float, backfill_s: float) -> None:
        """Land until cancelled: a backfill now and every `backfill_s`, polls in between. A
        pass that fails (a store that does not answer) is one line, and the next poll or
        backfill tries again: the service stays up."""
        loop = asyncio.get_running_loop()
        retry_s = poll_s
        while True:
            if (report := await _logged(self.land_once())) is None:
                await asyncio.sleep(retry_s)  # the backfill again, sooner than backfill_s
                retry_s = min(retry_s * 2, backfill_s)
                continue
            retry_s = poll_s
            _log_report(report)
            next_backfill = loop.time() + backfill_s
            while loop.time() < next_backfill:
                await asyncio.sleep(poll_s)
                report = await _logged(self._poll())
                if report is not None and report.manifests:
                    _log_report(report)

    async def _poll(self) -> LandReport:
        report = LandReport()
        for site, infos in await self.discovery.poll():
            await self._land_site(site, infos, report)
        return report

    async def _land_site(self, site: str, infos: list[ObjectInfo], report: LandReport) -> None:
        """The history checks that apply to one manifest at a time (`History.observe`: a
        manifest replayed or moved to another date folder is quarantined). Gaps in a site's
        numbered history are `skyferry verify`'s to report: a pass here sees only what is new."""
        ordered = sorted(infos, key=lambda i: i.key)
        # A few manifests at once: one's files are fetched and staged while another's are put
        # and recorded (waits on the destination). Each holds its share of the manifest
        # budget until it is done, which bounds the memory whatever the manifests claim.
        await self.putter.each([self._land_or_note(i, report) for i in ordered],
                               MANIFESTS_AHEAD)

    async def _land_or_note(self, info: ObjectInfo, report: LandReport) -> None:
        """A manifest the destination refuses (a folder where one of its files goes, a name it
        does not take) is one line, and landed again at the next backfill once the cause is
        fixed; the others land meanwhile. (With a queue its message comes back instead,
        agent/cloud/land_queue.py.)"""
        try:
            await self.land_manifest(info, report)
        except (PermanentBackendError, ObjectConflictError, LandError) as e:
            report.failed.append(Problem(info.key, str(e)))
            log.warning("%s was not landed, tried again at the next backfill: %s", info.key, e,
                        extra={"event": "land_manifest_failed", "object": info.key})

    async def land_manifest(self, info: ObjectInfo, report: LandReport) -> None:
        """Land one sealed manifest's files, or quarantine it; never both for one file."""
        report.manifests += 1
        mine = LandReport()  # this manifest's own counts: others land beside it
        try:
            await self._land_manifest(info, mine)
        finally:
            report.add(mine)
            self.metrics.landed(info, mine)  # agent/cloud/land_metrics.py
            if self.progress is not None:
                self.progress.advance(0, 1)

    async def _land_manifest(self, info: ObjectInfo, report: LandReport) -> None:
        try:
            m, cost = await self._load_counted(info)
        except TransientBackendError:
            raise  # the source did not answer: not the object's fault, tried again later
        except DECODE_ERRORS as e:
            self.history.unreadable(info.key.split("/", 1)[0], info.key)
            await self._quarantine(info.key, str(e), {}, report)
            return
        try:
            await self._land_loaded(info, m, report)
        finally:
            self._manifest_budget.give(cost)  # held while it lands (`_land_site`)

    async def _land_loaded(self, info: ObjectInfo, m: Manifest, report: LandReport) -> None:
        if self.progress is not None:
            self.progress.total_bytes += m.size
        replayed = self.history.observe(info.key, m)
        if replayed is not None:
            await self._quarantine(info.key, replayed, {}, report)
            return
        if await retrying(lambda: self.dest.size(book.landed_key(m.site, m.object_id))) \
                is not None:
            return  # landed by an earlier run (or another worker) meanwhile
        wanted, superseded = await self.putter.newer_than_landed(m)
        staged = await stage(self, m, set(wanted), self.staging, self.progress) \
            if wanted else None
        try:
            landed, lost = await self.putter.put_all(info.key, m,
                                                    staged.files if staged else [], wanted)
        finally:
            if staged is not None:
                await staged.remove()
        superseded += lost
        report.superseded += len(superseded)
        if staged is not None and (staged.failure or staged.bad):
            await self._quarantine(info.key, staged.failure or "files did not verify",
                                   staged.bad, report)
        if staged is not None and staged.failure and not staged.bad and not landed:
            return  # nothing of it verified: the quarantine report says why
        await self._record(info.key, m, landed, superseded, report)

    async def _record(self, sealed_key: str, m: Manifest, landed: list[book.Landed],
                      superseded: list[str], report: LandReport) -> None:
        """Create the landing record; the worker that created it writes the events.

        A pending marker is written first and removed last (after the events are posted
        downstream, if configured): a crash between the record and its events leaves it, and
        recovery writes the events from the record (agent/cloud/land_recover.py), so each
        landed file has exactly one event in the events objects.
        """
        events = self._next_events_key() if landed else None
        when = book.now_iso()
        lines = [f.event(uuid7(), when) for f in landed]
        record = book.landing_record(sealed_key, landed, superseded, events, lines)
        pending = book.pending_key(m.site, m.object_id, self.worker)
        if events is not None:
            await retrying(lambda: self.dest.put_plain(pending, book.pending_body(sealed_key),
                                                       metadata={}))
        landed_key = book.landed_key(m.site, m.object_id)
        created = await retrying(lambda: self.dest.put_if_absent(landed_key, record))
        if created and events is not None:
            await retrying(lambda: self.dest.put_if_absent(events, book.event_lines(lines)))
        guarded = self.putter.guarded
        if created and guarded is not None:  # a folder: synced before the marker goes
            await retrying(lambda: guarded.make_durable([landed_key, *([events] if events
                                                                        else [])]))
        if events is not None and created and self.downstream is not None:
            await self.downstream.submit(lines, pending)  # removes the marker once posted
        elif events is not None:
            await forget(self.dest, pending)
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
        with contextlib.suppress(ObjectConflictError):  # another worker's report came first
            await retrying(lambda: self.dest.put_if_absent(
                book.quarantine_key(sealed_key),
                book.quarantine_report(sealed_key, reason, files)))


async def _logged(work: Coroutine[Any, Any, LandReport]) -> LandReport | None:
    """`work`'s report, or None after one line saying why it failed (tried again later)."""
    try:
        return await work
    except (SkyferryError, OSError) as e:
        log.warning("landing pass failed, tried again at the next poll or backfill: %s", e,
                    extra={"event": "land_pass_failed"})
        return None


def _log_report(report: LandReport) -> None:
    log.info("landed %d files (%d bytes) from %d manifests; %d quarantined; %d not landed "
             "(refused by the destination)", report.files, report.bytes, report.manifests,
             len(report.quarantined), len(report.failed), extra={"event": "land_pass"})
