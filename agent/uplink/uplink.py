"""Workers that move sealed chunks, then manifests, to the backend while the gate is open.

The queue logic lives here; how the link is read under the uploads is agent/uplink/link_watch.py,
how requests are tried agent/uplink/attempts.py, the pauses agent/uplink/trouble.py and the
site's tips agent/uplink/tips.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import blake3

from agent.backends.protocol import Backend
from agent.config.settings import UplinkSettings
from agent.errors import BackendError, CorruptChunkError, DiskFullError, PermanentBackendError
from agent.format import layout
from agent.format.crypto import EdgeKeys
from agent.host.blocking import RunBlocking
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.store.store import ChunkWork, ManifestWork, Store, Work
from agent.uplink.attempts import Attempts
from agent.uplink.backend_check import BackendHealth
from agent.uplink.budget import Admission
from agent.uplink.gate import Clock, Gate
from agent.uplink.heartbeat import HeartbeatPublisher
from agent.uplink.horizon import Refresher
from agent.uplink.ledger import Ledger
from agent.uplink.link_watch import SILENT_RECHECK_S, LinkWatch
from agent.uplink.ratelimit import TokenBucket
from agent.uplink.tips import TipPublisher, TipWriter
from agent.uplink.trouble import Trouble
from agent.uplink.wakeup import Wakeup, wake_at_openings

log = logging.getLogger("skyferry.uplink")
URGENT = -1  # the index of the worker kept for the most urgent class


def read_verified(path: Path, size: int, sealed_hash: str, what: str) -> bytes:
    """Read a sealed file and check it against the index before it leaves the site.

    `what` names it in errors: a chunk id, or "manifest of object <id>". An empty hash (a
    manifest recorded before hashes were kept) is checked by size only.
    """
    kind = "manifest file" if what.startswith("manifest") else "chunk file"
    label = what if what.startswith("manifest") else f"chunk {what}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptChunkError(f"{kind} {path} is missing ({label})") from None
    if len(data) != size:
        raise CorruptChunkError(
            f"{kind} {path} is {len(data)} bytes, the index recorded {size}: truncated or "
            f"overwritten ({label})")
    if sealed_hash and blake3.blake3(data).hexdigest() != sealed_hash:
        raise CorruptChunkError(
            f"{kind} {path} does not match its recorded hash: damaged on disk ({label})")
    return data


class Uplink:
    def __init__(self, site: str, store: Store, backend: Backend, gate: Gate,
                 settings: UplinkSettings, run_blocking: RunBlocking, metrics: Metrics,
                 clock: Clock, admission: Admission | None = None,
                 keys: EdgeKeys | None = None) -> None:
        self.site = site
        self.store = store
        self.backend = backend
        self.gate = gate
        self.settings = settings
        self.run_blocking = run_blocking
        self.metrics = metrics
        self.clock = clock
        self.wakeup = Wakeup()
        self.in_flight: set[str] = set()
        self.limiter = TokenBucket(settings.rate_bps)
        # Chunks whose upload a closing gate cut off: the cloud may hold them already (the
        # body got through, the answer did not), so their next upload looks first.
        self._cut: set[str] = set()
        # Read-backs and acknowledgements run beside the next chunk (`_send_chunk`), in the
        # workers' task group so that shutdown cancels them with the workers.
        self._group: asyncio.TaskGroup | None = None
        self._opens_seen = gate.windows_opened
        self.trouble = Trouble(settings, metrics, store)
        self.attempts = Attempts(gate, settings, metrics, self.trouble.recovered)
        # Window byte budget, rate cap and stream count (agent/uplink/budget.py): work is claimed
        # through it so nothing is begun that cannot finish before the window ends.
        self.admission = admission or Admission(
            lambda t: gate.schedule.window_at(t), clock, uplink_rate_bps=settings.rate_bps,
            max_streams=settings.streams)
        self.link = LinkWatch(gate, backend, self.admission, clock, settings.streams)
        # With the site's keys, the uplink also sends tips: after manifests were acknowledged
        # and at each window opening, whenever the site's history changed.
        self.tips = None if keys is None else TipWriter(site, keys, store)
        self.tip_due = asyncio.Event()
        self.ledger = Ledger(store, run_blocking, metrics, self.trouble, self.tip_due)
        # [retention] Chunks past the dedup horizon are sent again before a manifest that
        # references them (agent/uplink/horizon.py); the store holds the horizon in force.
        h = None if store is None else store.horizon.horizon_s  # (unit tests pass no store)
        self.horizon = None if h is None else Refresher(
            site, store, backend, run_blocking, clock, h, lambda c: read_verified(
                store.chunk_path(c.chunk_id), c.sealed_size, c.sealed_hash, c.chunk_id))
        self._tip_publisher = None if self.tips is None else TipPublisher(
            self.tips, self.tip_due, gate, backend, self.attempts, run_blocking, metrics,
            settings.retry_max_s, self.ledger.shielded)
        self.heartbeat = None if keys is None else HeartbeatPublisher(
            site, keys, store, gate, backend, self.attempts, self.trouble, run_blocking, metrics,
            clock, settings.heartbeat_s)

    @property
    def health(self) -> BackendHealth | None:
        """Set by the daemon: the backend check (agent/uplink/backend_check.py) holds uploads
        back while the backend refuses, and hears of refusals met by uploads."""
        return self.trouble.health

    @health.setter
    def health(self, value: BackendHealth | None) -> None:
        self.trouble.health = value

    async def drain_acks(self) -> None:
        """At shutdown: let acknowledged uploads reach the index before the store closes."""
        await self.ledger.drain()

    def notify(self) -> None:
        """New work was queued (or an object's last chunk acknowledged): wake idle workers."""
        self.wakeup.notify()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._group = tg
                for i in range(self.settings.streams):
                    tg.create_task(self._worker(i), name=f"uplink-{i}")
                tg.create_task(self._worker(URGENT), name="uplink-urgent")
                tg.create_task(wake_at_openings(self.gate, self.wakeup),
                               name="uplink-openings")
                if self._tip_publisher is not None:
                    tg.create_task(self._tip_publisher.loop(), name="uplink-tips")
                if self.heartbeat is not None:
                    tg.create_task(self.heartbeat.loop(), name="uplink-heartbeat")
                tg.create_task(self.link.watch(), name="uplink-link-watch")
        finally:
            self._group = None

    async def _may_claim(self, index: int) -> bool:
        """Wait out what keeps worker `index` from claiming now; False: look again."""
        await self.gate.wait_open()
        if self.health is not None and not self.health.usable():
            await self.health.wait_usable()  # refused, or not checked yet: claim nothing
            return False
        pause = self.trouble.paused_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
            return False
        if self.gate.windows_opened != self._opens_seen:
            # Connections kept idle across a closed gate may be dead without knowing it
            # (the server timed them out while the link could not say so): start afresh.
            self._opens_seen = self.gate.windows_opened
            self.backend.renew()
        if index != URGENT and index >= self.link.streams():
            await asyncio.sleep(0.5)  # parked: fewer streams already fill this link
            return False
        if self.link.silent():
            await asyncio.sleep(SILENT_RECHECK_S)
            return False
        return True

    async def _worker(self, index: int) -> None:
        """Worker `index`. URGENT: the stream kept for the most urgent class (the lowest
        rank), which claims only its work, so an alarm never waits for a bulk chunk already
        on the wire."""
        max_rank = None
        if index == URGENT:
            max_rank = min((c.rank for c in self.store.classes.values()), default=0)
        while True:
            if not await self._may_claim(index):
                continue
            now = self.clock()
            cap = self.admission.cap(now)  # the window's or timetable's rate
            if cap != self.limiter.rate:
                self.limiter.set_rate(cap)
            work: Work | None
            seen = self.wakeup.seq  # work queued while the claim runs wakes it again
            try:
                work, budget = await self.run_blocking(
                    self.admission.claim, self.store, now, self.settings.aging_s, max_rank)
            except DiskFullError as e:  # the index could not record the claim
                self.trouble.index_full(e)
                continue
            if work is None:
                await self.wakeup.wait(seen)
                continue
            if budget.rate_bps is not None and isinstance(work, ChunkWork):
                log_event(log, logging.DEBUG, "upload_admitted", "chunk fits the window",
                          chunk=work.chunk_id, bytes=work.sealed_size,
                          manifest_bytes=work.manifest_bytes, at=now,
                          window_end=None if budget.window is None else budget.window.end,
                          rate_bps=budget.rate_bps, rate_source=budget.rate_source,
                          in_flight_bytes=budget.in_flight_bytes)
            try:
                ok = await self._until_gate_closes(work)
            except asyncio.CancelledError:
                self.ledger.release(work)
                raise
            finally:
                self.admission.finished(work)
            if not ok:
                await asyncio.sleep(self.settings.retry_initial_s)

    async def _until_gate_closes(self, work: Work) -> bool:
        """Run one upload; a closing gate (window end, pause) cancels it.

        A lost link does not cancel a chunk already on the wire (`LinkWatch.rides_out`): its
        request stays open and TCP sends the rest when the link is back, instead of what had
        crossed being thrown away and sent again.
        """
        upload = asyncio.create_task(self._do(work))
        closed = asyncio.create_task(self.gate.wait_closed())
        try:
            with self.link.upload():
                done, _ = await asyncio.wait({upload, closed},
                                             return_when=asyncio.FIRST_COMPLETED)
                if (upload not in done and isinstance(work, ChunkWork)
                        and self.link.rides_out(work, self.in_flight)):
                    done = {upload} if await self.link.ride_out(work, upload) else set()
        except asyncio.CancelledError:
            upload.cancel()
            raise
        finally:
            closed.cancel()
        if upload in done:
            return upload.result()
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upload
        if isinstance(work, ChunkWork):
            self.metrics.resent_bytes.inc(work.sealed_size)
            self._cut.add(work.chunk_id)
        self.ledger.release(work)
        log_event(log, logging.INFO, "upload_cut", "gate closed during upload; will re-send",
                  chunk=getattr(work, "chunk_id", None), object=work.object_id)
        return True

    async def _backend_failed(self, work: Work, e: BackendError, pause: bool) -> None:
        """Counted by kind where the attempt failed (`Attempts.with_retries`); the work goes
        back in line untouched: nothing about a refused upload changes the queue."""
        await self.run_blocking(self.ledger.release, work)
        if isinstance(e, PermanentBackendError):
            self.trouble.refused(e)
            return
        # an object in the way (ObjectConflictError): this chunk only
        log_event(log, logging.ERROR, "upload_failed", str(e), object=work.object_id)
        if pause:
            await asyncio.sleep(self.settings.retry_max_s)

    async def _do(self, work: Work) -> bool:
        """Upload one unit; False when it failed and went back in line."""
        try:
            if isinstance(work, ChunkWork):
                await self._send_chunk(work)
            else:
                await self._send_manifest(work)
            self.trouble.index_writable()
            return True
        except DiskFullError as e:
            await self.ledger.release_when_recorded(work, e)
            return False
        except CorruptChunkError as e:
            await self.ledger.corrupt(work, e)
            return True
        except BackendError as e:
            await self._backend_failed(work, e, pause=True)
            return False

    async def _send_chunk(self, work: ChunkWork) -> None:
        data: bytes = await self.run_blocking(
            read_verified, work.path, work.sealed_size, work.sealed_hash, work.chunk_id)
        key = layout.chunk_key(self.site, work.chunk_id)
        started = time.monotonic()  # delivered rate includes waiting for the rate limit
        await self.limiter.acquire(len(data))
        self.in_flight.add(work.chunk_id)
        was_cut = work.chunk_id in self._cut
        put_started = self.clock()  # [retention] the copy's Last-Modified is not earlier
        try:
            # From the second attempt on (or after a cut), look before sending: the previous
            # attempt may have been stored with only its acknowledgement lost.
            result = await self.attempts.with_retries(
                lambda n: self.backend.put_new(key, data, probe_first=n > 1 or was_cut))
        finally:
            self.in_flight.discard(work.chunk_id)
        self._cut.discard(work.chunk_id)
        if not result.written:  # already there: says nothing about the link's rate
            await self.ledger.chunk_acknowledged(work, len(data), False)
            self.notify()  # its object's manifest may be ready now
            return
        self.admission.record_transfer(len(data), started, time.monotonic())
        if self.horizon is not None:  # [retention] a copy written now, by this site
            await self.run_blocking(self.store.chunk_confirmed, work.chunk_id, put_started)
        check = self._check_chunk(work, key, len(data), result.etag)
        if self._group is None:
            await check
        else:
            # The read-back is one more round trip per chunk: on a long path with small
            # chunks, holding the stream for it would leave the link idle most of the time.
            # The stream moves on to its next chunk; this chunk is acknowledged (and its
            # object may commit) only once the read-back agrees.
            self._group.create_task(check, name=f"uplink-check-{work.chunk_id[:12]}")

    async def _check_chunk(self, work: ChunkWork, key: str, nbytes: int,
                           etag: str | None) -> None:
        """Read a chunk back, then record it acknowledged; put it back in line if that fails."""
        async def verify(n: int) -> bool:
            try:
                await self.backend.verify_written(key, nbytes, etag)
            except BackendError as e:
                if e.kind != "verify":
                    raise  # counted and retried by Attempts.with_retries
                self.metrics.errors.labels("backend_verify").inc()
                log_event(log, logging.WARNING, "upload_mismatch", str(e), chunk=work.chunk_id,
                          object=work.object_id)
                return False
            return True

        try:
            try:
                agreed = await self.attempts.while_open(
                    lambda: self.attempts.with_retries(verify))
            except asyncio.CancelledError:  # shutdown: back in line, like a worker's upload
                self.ledger.release(work)
                raise
            if not agreed:
                await self.run_blocking(self.ledger.release, work)  # removed: sent again
                return
            await self.ledger.chunk_acknowledged(work, nbytes, True)
            self.notify()  # its object's manifest may be ready now
            self.trouble.index_writable()
        except DiskFullError as e:  # see `_do`
            await self.ledger.release_when_recorded(work, e)
        except BackendError as e:
            await self._backend_failed(work, e, pause=False)

    async def _send_manifest(self, work: ManifestWork) -> None:
        data: bytes = await self.run_blocking(
            read_verified, work.path, work.manifest_bytes, work.manifest_hash,
            f"manifest of object {work.object_id}")
        key = layout.manifest_key(self.site, work.created, work.object_id)

        async def put(n: int) -> bool:
            if self.horizon is not None:  # [retention] its chunks within the horizon first
                await self.horizon.refresh(work.object_id)
            return await self.backend.put_if_absent(key, data, probe_first=n > 1)

        await self.attempts.with_retries(put)
        await self.ledger.manifest_acknowledged(work, len(data))
