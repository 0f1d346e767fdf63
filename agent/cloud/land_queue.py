"""Scale-out: any number of lander processes share the cloud's own work queue.

Workers (`QueueWorker`) receive one message at a time; the visibility timeout is the lease,
extended every third of it while the message's manifests land, and the message is deleted only
once they are landed or quarantined. A message received more than `max_receives` times (its
workers stopped before finishing), one whose landing failed on its last allowed receive, and
one that is no work item nor storage event at all go to the dead-letter queue with the reason.

The lister (`Lister`) feeds the queue: a backfill at start and every `backfill`, and in listing
mode a poll of the recent date folders in between; in notification mode the storage service's
events are the feed and the backfill is the safety net. One lister at a time, elected by a
lease object in the destination (`_skyferry/lister`, swapped by compare-and-swap, held for
`hold_s` and renewed each poll): when its holder stops, another worker takes over once it has
expired. Two listers at once (clocks that disagree, a lister paused past its lease) only send
duplicates, which are harmless: the landing record and the name records make landing
exactly-once whoever does it and however often.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from agent.backends.protocol import ObjectInfo
from agent.backends.retry import retrying
from agent.backends.workqueue import LeaseLostError, QueueMessage, WorkQueue
from agent.cloud import land_book as book
from agent.cloud.history import History
from agent.cloud.land import Lander, LandReport
from agent.cloud.land_book import BOOK
from agent.cloud.land_config import QueueWork
from agent.cloud.land_notify import SourcePlace, parse, work_item
from agent.errors import SkyferryError

log = logging.getLogger("skyferry.land")
LISTER_KEY = f"{BOOK}/lister"
RESEND_S = 6 * 3600.0  # a manifest queued this long ago and still not landed is queued again


class ListerLease:
    """Who lists: {"worker", "until"} in the destination, taken when expired (wall clock)."""

    def __init__(self, lander: Lander, hold_s: float) -> None:
        self.dest, self.worker, self.hold_s = lander.dest, lander.worker, hold_s

    async def hold(self) -> bool:
        """Take or renew the lease; True while this worker is the lister."""
        found = await retrying(lambda: self.dest.get_tagged(LISTER_KEY, max_size=4096))
        now = time.time()
        if found is not None:
            try:
                d = json.loads(found.data)
                holder, until = str(d["worker"]), float(d["until"])
            except (ValueError, KeyError, TypeError):
                holder, until = "", 0.0
            if holder != self.worker and until > now:
                return False
        body = json.dumps({"worker": self.worker, "until": now + self.hold_s}).encode()
        tag = found.etag if found is not None else None
        return await retrying(lambda: self.dest.put_if_match(LISTER_KEY, body, tag))


class Lister:
    """Sends a work item per manifest found that is neither landed nor quarantined."""

    def __init__(self, lander: Lander, queue: WorkQueue, discovery: str, poll_s: float,
                 backfill_s: float, lease_s: float) -> None:
        self.lander, self.queue, self.discovery = lander, queue, discovery
        self.poll_s, self.backfill_s = poll_s, backfill_s
        self.lease = ListerLease(lander, max(lease_s, 3 * poll_s))
        self._sent: dict[str, float] = {}  # key -> when queued, by this lister

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_backfill = 0.0
        while True:
            try:
                if not await self.lease.hold():
                    next_backfill = 0.0  # one that takes over starts with a backfill
                elif loop.time() >= next_backfill:
                    await self.backfill()
                    next_backfill = loop.time() + self.backfill_s
                elif self.discovery == "listing":
                    await self._send(await self.lander.discovery.poll())
            except SkyferryError as e:
                log.warning("listing for the work queue failed, will retry: %s", e,
                            extra={"event": "land_lister_failed"})
            await asyncio.sleep(self.poll_s)

    async def backfill(self) -> None:
        await self.lander.recover()
        found = await self.lander.discovery.backfill()
        keys = {i.key for _, infos in found for i in infos}
        self._sent = {k: t for k, t in self._sent.items() if k in keys}
        await self._send(found)
        log.info("backfill: %d manifests neither landed nor quarantined", len(keys),
                 extra={"event": "land_backfill"})

    async def _send(self, found: list[tuple[str, list[ObjectInfo]]]) -> None:
        now = time.monotonic()
        sent = 0
        for _, infos in found:
            for info in sorted(infos, key=lambda i: i.key):
                if now - self._sent.get(info.key, -RESEND_S) < RESEND_S:
                    continue
                await self.queue.send(work_item(info.key))
                self._sent[info.key] = now
                sent += 1
        if sent:
            log.info("queued %d manifests", sent, extra={"event": "land_queued"})


class QueueWorker:
    """Receives work from the queue and lands it, one message at a time."""

    def __init__(self, lander: Lander, queue: WorkQueue, work: QueueWork, wait_s: float) -> None:
        self.lander, self.queue, self.wait_s = lander, queue, wait_s
        self.lease_s, self.max_receives = work.lease_s, work.max_receives
        self.place = SourcePlace.of(lander.backend.url)
        self._current: QueueMessage | None = None  # the message held, with its latest receipt

    async def run(self) -> None:
        while True:
            try:
                messages = await self.queue.receive(1, self.lease_s, wait_s=self.wait_s)
            except SkyferryError as e:
                log.warning("receiving from the work queue failed, will retry: %s", e,
                            extra={"event": "land_receive_failed"})
                await asyncio.sleep(self.wait_s)
                continue
            for msg in messages:
                try:
                    await self.handle(msg)
                except SkyferryError as e:  # the queue refused a delete or a dead-letter
                    log.warning("message %s: %s; it comes back after its lease", msg.id, e,
                                extra={"event": "land_message_failed", "object": msg.id})

    async def handle(self, msg: QueueMessage) -> None:
        work = parse(msg.body, self.place)
        log.info("received message %s (receive %d): %s", msg.id, msg.receive_count,
                 ", ".join(work.manifests) or work.poison or "nothing to land",
                 extra={"event": "land_received", "object": msg.id,
                        "receives": msg.receive_count})
        if work.poison:
            await self._dead_letter(msg, work.poison)
            return
        if msg.receive_count > self.max_receives:
            await self._dead_letter(msg, f"received {msg.receive_count} times without being "
                                         "landed: the workers that took it stopped before they "
                                         "finished (killed? out of memory?)")
            return
        self._current = msg
        try:
            held = await self._land_leased(work.manifests)
        except (SkyferryError, OSError) as e:
            if msg.receive_count >= self.max_receives:
                await self._dead_letter(self._current, f"landing failed: {e}")
            else:
                log.warning("landing %s failed (receive %d of %d), it comes back after its "
                            "lease: %s", ", ".join(work.manifests), msg.receive_count,
                            self.max_receives, e, extra={"event": "land_message_failed"})
            return
        if held:
            await self.queue.delete(self._current)
            log.info("done with message %s", msg.id,
                     extra={"event": "land_message_done", "object": msg.id})

    async def _land_leased(self, keys: tuple[str, ...]) -> bool:
        """Land `keys` while extending the lease; False when the lease was lost (another
        worker has the message now: this landing stops, that one does it)."""
        landing = asyncio.create_task(self._land(keys))
        try:
            while True:
                done, _ = await asyncio.wait({landing}, timeout=self.lease_s / 3)
                if done:
                    landing.result()
                    return True
                try:
                    assert self._current is not None
                    self._current = await self.queue.extend(self._current, self.lease_s)
                except LeaseLostError:
                    log.warning("lease lost on %s: another worker lands it",
                                ", ".join(keys), extra={"event": "land_lease_lost"})
                    return False
                except SkyferryError as e:  # the next extension may get through in time
                    log.warning("extending a lease failed: %s", e,
                                extra={"event": "land_extend_failed"})
        finally:
            if not landing.done():
                landing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await landing

    async def _land(self, keys: tuple[str, ...]) -> None:
        # The per-manifest history checks (date folder); no state kept across messages.
        self.lander.history = History()
        report = LandReport()
        for key in keys:
            if await self._done(key):
                continue  # a duplicate (a new lister queues what is not landed yet): no fetch
            await self.lander.land_manifest(ObjectInfo(key, 0), report)

    async def _done(self, key: str) -> bool:
        """Landed or quarantined already (the manifest's object id ends its key)."""
        dest = self.lander.dest
        landed = book.landed_key(key.split("/", 1)[0], key.rsplit("/", 1)[-1])
        return (await retrying(lambda: dest.size(landed)) is not None
                or await retrying(lambda: dest.size(book.quarantine_key(key))) is not None)

    async def _dead_letter(self, msg: QueueMessage, reason: str) -> None:
        log.warning("dead-lettered message %s: %s", msg.id, reason,
                    extra={"event": "land_dead_letter", "object": msg.id})
        await self.queue.dead_letter(msg, reason)


def shared_markers(lander: Lander, work: QueueWork) -> None:
    """Other workers share the destination: leave their live pending markers alone."""
    lander.marker_min_age_s = 2 * work.lease_s
    lander.marker_orphan_s = 86400.0


async def run_with_queue(lander: Lander, queue: WorkQueue, work: QueueWork, discovery: str,
                         poll_s: float, backfill_s: float) -> None:
    """A worker and a would-be lister in this process, until cancelled."""
    shared_markers(lander, work)
    lister = Lister(lander, queue, discovery, poll_s, backfill_s, work.lease_s)
    worker = QueueWorker(lander, queue, work, poll_s)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(lister.run(), name="land-lister")
        tasks.create_task(worker.run(), name="land-worker")
