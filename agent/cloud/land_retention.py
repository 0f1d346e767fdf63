"""Retention: the lander deletes sealed objects of the source once no site can need them again
(docs/FORMAT.md, "Retention"; `[land] delete_sealed_after`, off by default).

After a backfill, for each site, from what is durable: the source listing (keys, Last-Modified
by the storage service's clock) and the landing records and quarantine reports in the
destination. Nothing of a site is deleted unless

1. every manifest of the site in the source is landed or quarantined, and
2. the site's newest manifest (by Last-Modified) declares a dedup horizon `h` with
   `h + retention_margin <= delete_sealed_after` (the site then re-sends, before a manifest,
   every chunk whose last copy is older than `h` by its own clock).

Then what is at least `delete_sealed_after` old by the storage's own clock goes: chunks and
their re-sent copies, and the manifests that landed (quarantined ones stay, as evidence; tips
stay: they are the site's history and a few hundred bytes each). "Now" is the Last-Modified of a
probe object written just before the listings, so the lander's own clock plays no part.
Deleting twice is harmless; every pass that deletes writes a record of what it deleted under
`_skyferry/retention/` in the destination, and logs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.backends.protocol import Backend, ObjectInfo
from agent.backends.retry import retrying
from agent.cloud import land_book as book
from agent.cloud.land_discover import listing
from agent.cloud.restore_read import DECODE_ERRORS, CloudReader
from agent.errors import BackendError, ObjectNotFoundError
from agent.format import layout
from agent.obs.logs import log_event

log = logging.getLogger("skyferry.land")
CLOCK_PREFIX = f"{book.BOOK}/clock/"  # in the source: probes that read the storage's clock


def deletable(last_modified: float | None, storage_now: float, grace_s: float) -> bool:
    """At least `grace_s` old by the storage's clock (exactly `grace_s`: yes)."""
    return last_modified is not None and last_modified + grace_s <= storage_now


def promise_kept(horizon_s: int, grace_s: float, margin_s: float) -> bool:
    """Does a site declaring `horizon_s` let this lander delete after `grace_s`?"""
    return horizon_s > 0 and horizon_s + margin_s <= grace_s


def retention_key(day: str, worker: str, n: int) -> str:
    return f"{book.BOOK}/retention/{day}/{worker}-{n}.json"


@dataclass
class RetentionReport:
    deleted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # site -> why nothing of it was deleted
    storage_now: float = 0.0


class Retention:
    def __init__(self, source: Backend, dest: Backend, reader: CloudReader, grace_s: float,
                 margin_s: float, worker: str,
                 storage_clock: Callable[[], Awaitable[float]] | None = None) -> None:
        self.source, self.dest, self.reader = source, dest, reader
        self.grace_s, self.margin_s, self.worker = grace_s, margin_s, worker
        self.storage_clock = storage_clock or self.probe_clock
        self._passes = 0
        self.last: RetentionReport | None = None

    async def run(self, sites: list[str]) -> RetentionReport:
        report = RetentionReport()
        for site in sites:
            try:
                await self._site(site, report)
            except BackendError as e:  # the next pass tries again
                report.kept[site] = f"retention pass failed: {e}"
        for site, why in report.kept.items():
            log_event(log, logging.INFO, "retention_kept", f"{site}: nothing deleted: {why}",
                      site=site)
        if report.deleted:
            await self._record(report)
        self.last = report
        return report

    async def probe_clock(self) -> float:
        """The storage's "now": the Last-Modified of a probe written to the source."""
        key = f"{CLOCK_PREFIX}{self.worker}-{secrets.token_hex(4)}"
        await retrying(lambda: self.source.put_plain(key, b"", metadata={}))
        try:
            infos = await listing(self.source, CLOCK_PREFIX)
        finally:
            await retrying(lambda: self.source.delete(key))
        for info in infos:
            if info.key == key and info.last_modified is not None:
                return info.last_modified
        raise BackendError(f"{self.source.url}: a listing gave no Last-Modified for {key}")

    async def _site(self, site: str, report: RetentionReport) -> None:
        now = report.storage_now = await self.storage_clock()  # before the listings
        chunks = await listing(self.source, f"{site}/chunks/")
        manifests = await listing(self.source, layout.manifests_prefix(site))
        landed = {_leaf(i.key) for i in await listing(self.dest, book.landed_prefix(site))}
        quarantined = {i.key for i in await listing(self.dest, book.quarantine_prefix(site))}
        waiting = [i for i in manifests if _leaf(i.key) not in landed
                   and book.quarantine_key(i.key) not in quarantined]
        if waiting:
            report.kept[site] = f"{len(waiting)} manifests not landed yet ({waiting[0].key})"
            return
        why = await self._unpromised(manifests, landed)
        if why:
            report.kept[site] = why
            return
        doomed = [i for i in chunks if deletable(i.last_modified, now, self.grace_s)]
        doomed += [i for i in manifests if _leaf(i.key) in landed
                   and deletable(i.last_modified, now, self.grace_s)]
        for info in doomed:
            await self._delete(info)
            report.deleted.append(info.key)
        if doomed:
            log_event(log, logging.INFO, "retention_deleted",
                      f"{site}: deleted {len(doomed)} sealed objects at least "
                      f"{self.grace_s:g}s old", site=site, count=len(doomed),
                      bytes=sum(i.size for i in doomed))

    async def _unpromised(self, manifests: list[ObjectInfo], landed: set[str]) -> str:
        """Why the site's newest manifest does not allow deleting ("" when it does)."""
        if not manifests:
            return "no manifests, so no declared dedup horizon"
        newest = max(manifests, key=lambda i: (i.last_modified or 0.0, i.key))
        if _leaf(newest.key) not in landed:
            return f"its newest manifest {newest.key} was quarantined"
        try:
            m = await self.reader.load_manifest(newest.key, newest.size)
        except DECODE_ERRORS as e:
            return f"its newest manifest {newest.key} does not open: {e}"
        if not promise_kept(m.horizon, self.grace_s, self.margin_s):
            declared = f"dedup horizon {m.horizon}s" if m.horizon > 0 else "no dedup horizon"
            return (f"its newest manifest declares {declared}; delete_sealed_after "
                    f"{self.grace_s:g}s needs one of at most {self.grace_s - self.margin_s:g}s "
                    f"([uplink] dedup_horizon at the site)")
        return ""

    async def _delete(self, info: ObjectInfo) -> None:
        with contextlib.suppress(ObjectNotFoundError):  # deleted by an earlier pass meanwhile
            await retrying(lambda: self.source.delete(info.key))
        log_event(log, logging.DEBUG, "retention_delete", f"deleted {info.key}", object=info.key,
                  bytes=info.size, last_modified=info.last_modified)

    async def _record(self, report: RetentionReport) -> None:
        self._passes += 1
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        body = json.dumps({"when": book.now_iso(), "storage_now": report.storage_now,
                           "delete_sealed_after_s": self.grace_s, "deleted": report.deleted,
                           "kept": report.kept}, ensure_ascii=False, indent=1).encode()
        await retrying(lambda: self.dest.put_if_absent(
            retention_key(day, self.worker, self._passes), body))


def _leaf(key: str) -> str:
    return key.rsplit("/", 1)[-1]
