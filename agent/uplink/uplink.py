"""Workers that move sealed chunks, then manifests, to the backend while the gate is open."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import blake3
from tenacity import AsyncRetrying, retry_if_exception, stop_never

from agent.backends.protocol import Backend
from agent.backends.retry import backoff, is_transient
from agent.config.settings import UplinkSettings
from agent.errors import BackendError, CorruptChunkError, DiskFullError, PermanentBackendError
from agent.format import layout
from agent.format.crypto import EdgeKeys
from agent.host.blocking import RunBlocking
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.store.store import ChunkWork, ManifestWork, Store, Work
from agent.uplink.backend_check import BackendHealth
from agent.uplink.budget import Admission
from agent.uplink.gate import Clock, Gate
from agent.uplink.ratelimit import TokenBucket
from agent.uplink.tips import BuiltTip, TipWriter, send_tip, tip_loop

T = TypeVar("T")
log = logging.getLogger("skyferry.uplink")
LONG_PATH_S = 0.02  # a round trip from here on: keep two streams (`Uplink._streams`)
# A held upload (`_ride_out`) whose connection is still in TCP's retransmission backoff this
# long after the link came back, while nothing else is being sent, is sent again instead.
STALL_GRACE_S = 1.0
STALL_NEXT_TRY_S = 0.5  # ... and only if TCP's next try is further off than this (and
# than sending the whole chunk again would take)
# While every connection with bytes under way has gone unanswered this many retransmission
# timeouts in a row, the link is most likely gone (before the link monitor is sure): start
# nothing new, look again after SILENT_RECHECK_S.
SILENT_RETRANSMITS = 2
SILENT_RECHECK_S = 0.25
_INDEX_FULL_PAUSE_S = 2.0  # the store's disk is full: wait this long between tries


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
        # With the site's keys, the uplink also sends tips: after manifests were acknowledged
        # and at each window opening, whenever the site's history changed (agent/uplink/tips.py).
        self.tips = None if keys is None else TipWriter(site, keys, store)
        self.tip_due = asyncio.Event()
        self.store = store
        self.backend = backend
        self.gate = gate
        self.settings = settings
        self.run_blocking = run_blocking
        self.metrics = metrics
        self.clock = clock
        self._wake = asyncio.Event()
        self.in_flight: set[str] = set()
        self.limiter = TokenBucket(settings.rate_bps)
        self._acks: set[asyncio.Task[None]] = set()
        # Chunks whose upload a closing gate cut off: the cloud may hold them already (the
        # body got through, the answer did not), so their next upload looks first.
        self._cut: set[str] = set()
        self._riding = 0  # uploads kept open through a lost link (`_ride_out`)
        self._active = 0  # uploads under way (held ones included)
        # Read-backs and acknowledgements run beside the next chunk (`_send_chunk`), in the
        # workers' task group so that shutdown cancels them with the workers.
        self._group: asyncio.TaskGroup | None = None
        self._opens_seen = gate.windows_opened
        # A permanent refusal (credentials, missing container) pauses every worker until this
        # monotonic time, and is logged once per kind instead of once per chunk and worker.
        self._paused_until = 0.0
        self._refusal: str | None = None
        # Set by the daemon: the backend check (agent/uplink/backend_check.py) holds uploads back
        # while the backend refuses, and hears of refusals met by uploads.
        self.health: BackendHealth | None = None
        self._index_full_logged = False
        # Window byte budget, rate cap and stream count (agent/uplink/budget.py): work is claimed
        # through it so nothing is begun that cannot finish before the window ends.
        self.admission = admission or Admission(
            lambda t: gate.schedule.window_at(t), clock, uplink_rate_bps=settings.rate_bps,
            max_streams=settings.streams)

    async def _shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run bookkeeping that must finish even when the worker is cancelled."""
        task = asyncio.ensure_future(coro)
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)
        await asyncio.shield(task)

    async def drain_acks(self) -> None:
        """At shutdown: let acknowledged uploads reach the index before the store closes."""
        if self._acks:
            await asyncio.gather(*self._acks, return_exceptions=True)

    def notify(self) -> None:
        """New work was queued: wake idle workers."""
        self._wake.set()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._group = tg
                for i in range(self.settings.streams):
                    tg.create_task(self._worker(i), name=f"uplink-{i}")
                if self.tips is not None:
                    tg.create_task(tip_loop(self), name="uplink-tips")
        finally:
            self._group = None

    async def _worker(self, index: int) -> None:
        while True:
            await self.gate.wait_open()
            if self.health is not None and not self.health.usable():
                await self.health.wait_usable()  # refused, or not checked yet: claim nothing
                continue
            pause = self._paused_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            if self.gate.windows_opened != self._opens_seen:
                # Connections kept idle across a closed gate may be dead without knowing it
                # (the server timed them out while the link could not say so): start afresh.
                self._opens_seen = self.gate.windows_opened
                self.backend.renew()
            if index >= self._streams():
                await asyncio.sleep(0.5)  # parked: fewer streams already fill this link
                continue
            if self._link_silent():
                await asyncio.sleep(SILENT_RECHECK_S)
                continue
            now = self.clock()
            cap = self.admission.cap(now)  # the window's or timetable's rate
            if cap != self.limiter.rate:
                self.limiter.set_rate(cap)
            work: Work | None
            try:
                work, budget = await self.run_blocking(
                    self.admission.claim, self.store, now, self.settings.aging_s)
            except DiskFullError as e:  # the index could not record the claim
                self._index_full(e)
                continue
            if work is None:
                self._wake.clear()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives just as the event fires (shutdown would hang).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
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
                self._release(work)
                raise
            finally:
                self.admission.finished(work)
            if not ok:
                await asyncio.sleep(self.settings.retry_initial_s)

    def _streams(self) -> int:
        """How many workers may claim work now."""
        wanted = self.admission.streams_wanted()
        rtt = self.admission.rtt()
        if rtt is not None and rtt >= LONG_PATH_S:
            # A lone stream leaves the link idle between two chunks for several round trips
            # (the answer, the read-back, the index, the next claim): ~10 % of the time at
            # 15 Mbit/s and 40 ms (benchmarks/link.py). A second stream keeps the link busy.
            wanted = max(wanted, min(2, self.settings.streams))
        # Uploads kept open through a lost link do not hold back fresh ones once it is back.
        return wanted + self._riding

    async def _until_gate_closes(self, work: Work) -> bool:
        """Run one upload; a closing gate (window end, pause) cancels it.

        A lost link does not cancel a chunk already on the wire (see `_rides_out`): its
        request stays open and TCP sends the rest when the link is back, instead of what had
        crossed being thrown away and sent again.
        """
        upload = asyncio.create_task(self._do(work))
        closed = asyncio.create_task(self.gate.wait_closed())
        self._active += 1
        try:
            done, _ = await asyncio.wait({upload, closed}, return_when=asyncio.FIRST_COMPLETED)
            if upload not in done and isinstance(work, ChunkWork) and self._rides_out(work):
                done = {upload} if await self._ride_out(work, upload) else set()
        except asyncio.CancelledError:
            upload.cancel()
            raise
        finally:
            self._active -= 1
            closed.cancel()
        if upload in done:
            return upload.result()
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upload
        if isinstance(work, ChunkWork):
            self.metrics.resent_bytes.inc(work.sealed_size)
            self._cut.add(work.chunk_id)
        self._release(work)
        log_event(log, logging.INFO, "upload_cut", "gate closed during upload; will re-send",
                  chunk=getattr(work, "chunk_id", None), object=work.object_id)
        return True

    def _rides_out(self, work: ChunkWork) -> bool:
        """Keep this upload open while the gate is closed?

        Only when the link was lost (not at a window's end or a pause), for a chunk whose
        request is under way, to a backend over a network: a TCP connection outlives an outage
        of seconds to minutes (an intermittent LEO link), a folder has no wire to resume on.
        """
        if work.chunk_id not in self.in_flight:
            return False
        state = self.gate.state()
        in_window = state.window is not None or state.flushing
        return (not state.link_up and not state.paused and in_window
                and not self.backend.url.startswith("file:"))

    async def _ride_out(self, work: ChunkWork, upload: asyncio.Task[bool]) -> bool:
        """Wait for an upload the link left mid-way; False if a window end or pause cuts it,
        or if it stays stalled after the link is back (`_stalled`).

        Meanwhile it does not count as one of the streams: once the link is back, other
        workers start at once while TCP (maybe still backing off) finishes this one; a request
        that never resumes ends at the backend's deadline and is retried.
        """
        log_event(log, logging.INFO, "upload_held", "link lost mid-upload: the request stays "
                  "open and resumes with the link", chunk=work.chunk_id, object=work.object_id)
        self._riding += 1
        try:
            while not upload.done():
                state = self.gate.state()
                if state.paused or (state.window is None and not state.flushing):
                    return False
                if self._stalled(work.sealed_size):
                    log_event(log, logging.INFO, "upload_stalled", "the link is back but this "
                              "upload's connection still waits out TCP's retransmission "
                              "backoff, and nothing else is being sent: sending it again on a "
                              "fresh connection", chunk=work.chunk_id, object=work.object_id)
                    return False
                await asyncio.wait({upload}, timeout=0.25)
            return True
        finally:
            self._riding -= 1

    def _link_silent(self) -> bool:
        """Has the link gone silent under the uploads, before the link monitor noticed?

        The monitor needs a few seconds to be sure (probe interval, timeouts, hysteresis).
        A request begun meanwhile waits in the void and TCP's backoff, and when the link
        returns may find that the server closed its pooled connection, failing after part of
        its body crossed: sent twice. Held uploads (`_ride_out`) are not counted: once the
        link is back their connections may still be backing off while fresh ones move.
        """
        conns = self.backend.connections()
        if not conns:
            return False
        silent = [c for c in conns if c.retransmits >= SILENT_RETRANSMITS]
        return len(silent) == len(conns) and len(silent) > self._riding

    def _stalled(self, nbytes: int) -> bool:
        """Are the held uploads stuck in TCP's retransmission backoff on a link that is back?

        After a silent outage (a black hole) TCP retries at exponentially growing intervals,
        so a request may sit idle for seconds after the link returned. While other uploads
        keep the link busy that costs nothing and waiting wastes nothing; once nothing else is
        being sent it costs link time, and sending the chunk again costs at most the chunk in
        flight. The kernel's view of this process's connections to the service tells a
        backed-off connection (no acknowledgement since its last timeout) from one that moves,
        and when TCP will try again: the upload is sent again only if that is further off than
        sending all `nbytes` again would take (what had crossed is not known).
        """
        back = self.gate.opened_at
        if (not self.gate.is_open() or back is None
                or time.monotonic() - back < STALL_GRACE_S or self._active > self._riding):
            return False
        conns = self.backend.connections()
        if conns is None:
            return False
        rate, _ = self.admission.planning_rate(self.clock())
        wait_s = max(STALL_NEXT_TRY_S, nbytes / rate if rate else 0.0)
        stalled = [c for c in conns if c.stalled and c.next_retransmit_s >= wait_s]
        # Connections cannot be matched to requests: act only when there are as many stalled
        # connections as held uploads (a resumed one would leave one fewer).
        return len(stalled) >= self._riding

    def _release(self, work: Work) -> None:
        if isinstance(work, ChunkWork):
            self.store.release_chunk(work.chunk_id)
        else:
            self.store.release_manifest(work.object_id)

    async def _do(self, work: Work) -> bool:
        """Upload one unit; False when it failed and went back in line."""
        try:
            if isinstance(work, ChunkWork):
                await self._send_chunk(work)
            else:
                await self._send_manifest(work)
            self._index_writable()
            return True
        except DiskFullError as e:
            # The index could not record what the cloud acknowledged: the work goes back in
            # line, and sending it again is harmless (put_if_absent finds the cloud copy).
            self._index_full(e)
            while True:
                try:
                    await self.run_blocking(self._release, work)
                    return False
                except DiskFullError:
                    await asyncio.sleep(_INDEX_FULL_PAUSE_S)
        except CorruptChunkError as e:
            if isinstance(work, ManifestWork):
                await self.run_blocking(self.store.mark_manifest_corrupt, work.object_id)
                self.metrics.errors.labels("corrupt_manifest").inc()
                log_event(log, logging.ERROR, "manifest_corrupt",
                          f"{e}; object {work.object_id} marked damaged and not sent; "
                          "re-ingest it from its source", object=work.object_id)
                return True
            objects = await self.run_blocking(self.store.mark_chunk_corrupt, work.chunk_id)
            if not objects:
                # No queued object needs it any more: its file was released while this worker
                # had it in flight (another chunk of its object was found damaged). Nothing is
                # lost here, so it is no second error.
                log_event(log, logging.DEBUG, "chunk_released",
                          f"{e}; no queued object needs it", chunk=work.chunk_id)
                return True
            self.metrics.errors.labels("corrupt_chunk").inc()
            log_event(log, logging.ERROR, "chunk_corrupt",
                      f"{e}; objects {', '.join(objects) or '(none)'} marked damaged; "
                      "re-ingest them from their source", chunk=work.chunk_id)
            return True
        except BackendError as e:
            # Counted by kind where the attempt failed (_with_retries); the work goes back in
            # line untouched: nothing about a refused upload changes the queue.
            await self.run_blocking(self._release, work)
            if isinstance(e, PermanentBackendError):
                self._refused(e)
            else:  # an object in the way (ObjectConflictError): this chunk only
                log_event(log, logging.ERROR, "upload_failed", str(e), object=work.object_id)
                await asyncio.sleep(self.settings.retry_max_s)
            return False

    def _refused(self, e: PermanentBackendError) -> None:
        """Credentials, permissions or a missing container: retrying now cannot help."""
        self._paused_until = time.monotonic() + self.settings.retry_max_s
        if self.health is not None:
            # One line per change of the backend's state, shared with its checks; uploads
            # wait until a check says ok again.
            self.health.refused_upload(e)
            return
        if self._refusal != e.kind:
            self._refusal = e.kind
            log_event(log, logging.ERROR, "backend_refused",
                      f"{e}; uploads pause and are tried again every "
                      f"{self.settings.retry_max_s:g}s; the queue is kept", kind=e.kind)

    def _index_full(self, e: DiskFullError) -> None:
        """Every worker pauses a moment; logged once until an upload is recorded again."""
        self._paused_until = time.monotonic() + _INDEX_FULL_PAUSE_S
        self.store.give_up_spare()  # the retry finds room (the headroom was taken)
        if not self._index_full_logged:
            self._index_full_logged = True
            self.metrics.errors.labels("disk_full").inc()
            log_event(log, logging.ERROR, "uplink_disk_full",
                      f"uploads cannot be recorded: {e}; uploads pause and are tried again "
                      f"every {_INDEX_FULL_PAUSE_S:g}s (recording them is what frees space)")

    def _index_writable(self) -> None:
        if self._index_full_logged:
            self._index_full_logged = False
            log_event(log, logging.INFO, "uplink_resumed", "uploads are recorded again")

    def _recovered(self) -> None:
        if self._refusal is not None:
            self._refusal = None
            log_event(log, logging.INFO, "backend_recovered", "the backend accepts uploads again")

    async def _gate_aware_sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        # If the window closed meanwhile, wait for the next one instead of spending an attempt
        # against a dead link. (A closing gate also cancels the upload outright; this covers
        # the moment between the close and that cancellation.)
        await self.gate.wait_open()

    async def _with_retries(self, fn: Callable[[int], Awaitable[T]]) -> T:
        """Retry transient failures (timeouts, resets, 5xx, 429) with backoff and jitter.

        No attempt limit: giving up would only put the chunk back in line and restart the
        backoff from its shortest delay: more requests against a struggling service, not
        fewer. The chunk leaves this loop on success, on a permanent error, or when the gate
        closes and cancels it. obstore's Retry-After is not visible to us (it drops response
        headers), so throttling gets the same capped exponential backoff.
        """
        attempts = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=backoff(self.settings.retry_initial_s, self.settings.retry_max_s),
            stop=stop_never,
            sleep=self._gate_aware_sleep,
            reraise=True,
        )
        async for attempt in attempts:
            with attempt:
                try:
                    result = await fn(attempt.retry_state.attempt_number)
                except BackendError as e:
                    self.metrics.errors.labels(f"backend_{e.kind}").inc()
                    if is_transient(e):
                        log_event(log, logging.DEBUG, "upload_retry", str(e), kind=e.kind,
                                  attempt=attempt.retry_state.attempt_number)
                    raise
                self._recovered()
                return result
        raise AssertionError("unreachable")

    async def _send_chunk(self, work: ChunkWork) -> None:
        data: bytes = await self.run_blocking(
            read_verified, work.path, work.sealed_size, work.sealed_hash, work.chunk_id)
        key = layout.chunk_key(self.site, work.chunk_id)
        started = time.monotonic()  # delivered rate includes waiting for the rate limit
        await self.limiter.acquire(len(data))
        self.in_flight.add(work.chunk_id)
        was_cut = work.chunk_id in self._cut
        try:
            # From the second attempt on (or after a cut), look before sending: the previous
            # attempt may have been stored with only its acknowledgement lost.
            result = await self._with_retries(
                lambda n: self.backend.put_new(key, data, probe_first=n > 1 or was_cut))
        finally:
            self.in_flight.discard(work.chunk_id)
        self._cut.discard(work.chunk_id)
        if not result.written:  # already there: says nothing about the link's rate
            await self._shielded(self._chunk_acknowledged(work, len(data), False))
            return
        self.admission.record_transfer(len(data), started, time.monotonic())
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
                    raise  # counted and retried by _with_retries
                self.metrics.errors.labels("backend_verify").inc()
                log_event(log, logging.WARNING, "upload_mismatch", str(e), chunk=work.chunk_id,
                          object=work.object_id)
                return False
            return True

        try:
            try:
                agreed = await self._while_open(lambda: self._with_retries(verify))
            except asyncio.CancelledError:  # shutdown: back in line, like a worker's upload
                self._release(work)
                raise
            if not agreed:
                await self.run_blocking(self._release, work)  # removed: sent again
                return
            await self._shielded(self._chunk_acknowledged(work, nbytes, True))
            self._index_writable()
        except DiskFullError as e:  # see `_do`
            self._index_full(e)
            while True:
                try:
                    await self.run_blocking(self._release, work)
                    return
                except DiskFullError:
                    await asyncio.sleep(_INDEX_FULL_PAUSE_S)
        except BackendError as e:
            await self.run_blocking(self._release, work)
            if isinstance(e, PermanentBackendError):
                self._refused(e)
            else:
                log_event(log, logging.ERROR, "upload_failed", str(e), object=work.object_id)

    async def _while_open(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a small request; if the gate closes first, run it again once it reopens.

        For requests cheaper to repeat than to wait for: one held open through a black hole
        would wait out TCP's backoff, or the backend's whole deadline.
        """
        while True:
            await self.gate.wait_open()
            task = asyncio.ensure_future(fn())
            closed = asyncio.ensure_future(self.gate.wait_closed())
            try:
                await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if not task.cancelled():
                return task.result()

    async def _chunk_acknowledged(self, work: ChunkWork, nbytes: int, written: bool) -> None:
        await self.run_blocking(self.store.mark_chunk_uploaded, work.chunk_id)
        if written:
            self.metrics.sent_bytes.labels("chunk").inc(nbytes)
        log_event(log, logging.DEBUG, "chunk_sent", "chunk acknowledged", chunk=work.chunk_id,
                  object=work.object_id, bytes=nbytes, sent=written)

    async def _send_manifest(self, work: ManifestWork) -> None:
        data: bytes = await self.run_blocking(
            read_verified, work.path, work.manifest_bytes, work.manifest_hash,
            f"manifest of object {work.object_id}")
        key = layout.manifest_key(self.site, work.created, work.object_id)
        await self._with_retries(
            lambda n: self.backend.put_if_absent(key, data, probe_first=n > 1))
        await self._shielded(self._manifest_acknowledged(work, len(data)))

    async def _manifest_acknowledged(self, work: ManifestWork, nbytes: int) -> None:
        await self.run_blocking(self.store.mark_committed, work.object_id)
        self.metrics.sent_bytes.labels("manifest").inc(nbytes)
        self.metrics.committed_objects.labels(work.priority).inc()
        self.tip_due.set()
        log_event(log, logging.INFO, "object_committed", "object complete in the cloud",
                  object=work.object_id, **{"class": work.priority})

    async def send_tip(self) -> BuiltTip | None:
        """Send the site's tip now if its history changed since the last one
        (agent/uplink/tips.py)."""
        return await send_tip(self)
