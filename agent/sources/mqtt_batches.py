"""MQTT messages batched per class, made durable, then acknowledged in arrival order.

A batch is sealed at its class's size, count or age limit (or early, when open batches hold half
the broker's in-flight window). Batches of one class are committed one after another, so they
become durable in arrival order; acknowledgements go out only for durable messages, in the order
they arrived, and only on the connection that delivered them (see agent/sources/mqtt.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import paho.mqtt.client as paho

from agent.broker.paho_adapter import PahoAccess
from agent.config.settings import MqttSettings
from agent.errors import QuotaExceededError, SkyferryError
from agent.host.blocking import RunBlocking
from agent.ingest.requests import BatchRequest, IngestResult
from agent.obs.logs import Throttled, log_event
from agent.obs.metrics import Metrics
from agent.sources.mqtt_records import Received, batch_name_prefix, encode_jsonl

log = logging.getLogger("skyferry.mqtt")
IngestBatch = Callable[[BatchRequest], Awaitable[IngestResult]]
_TICK_S = 0.05
_MAX_COMMITS = 2  # batches being made durable at once: overlaps fsync with receiving


@dataclass
class Batch:
    cls: str
    started: float  # loop time of the first message
    records: list[Received] = field(default_factory=list)
    nbytes: int = 0


class MqttBatches:
    """What has been received and not yet acknowledged, by class and in arrival order."""

    def __init__(self, settings: MqttSettings, ingest_batch: IngestBatch,
                 run_blocking: RunBlocking, metrics: Metrics, stop: asyncio.Event) -> None:
        self.settings = settings
        self.ingest_batch = ingest_batch
        self.run_blocking = run_blocking
        self.metrics = metrics
        self.stop = stop  # set when the daemon stops: a refused commit is left, not retried
        self.paho: PahoAccess | None = None  # acknowledgements go out through this connection
        self.generation = 0  # which connection that is (a message carries the one it came on)
        # Any client of the broker can send oversize messages: logged in a burst, then
        # summarised (each is still counted and acknowledged).
        self._too_large = Throttled(every_s=10.0, burst=20)
        self._batches: dict[str, Batch] = {}
        self._batch_opened = asyncio.Event()  # the age ticker sleeps while no batch is open
        self._acks: collections.deque[Received] = collections.deque()
        self.limbo: list[Received] = []  # unacked when a connection dropped (see take_limbo)
        self._commits: set[asyncio.Task[None]] = set()
        self._commit_slots = asyncio.Semaphore(_MAX_COMMITS)
        # One commit at a time per class, in sealing order (asyncio.Lock wakes waiters FIFO):
        # batches then become durable in arrival order and acknowledgements are never held
        # behind an older batch of the same class, which keeps duplicates after a crash few.
        self._class_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._class_of: dict[str, str] = {}

    def reconfigure(self, settings: MqttSettings) -> None:
        """New subscriptions and batching limits; open batches keep their class."""
        self.settings = settings
        self._class_of.clear()

    def receive(self, r: Received) -> None:
        if len(r.payload) > self.settings.max_message_bytes:
            self.refuse(r)
        else:
            self.add(r, track_ack=r.qos > 0)

    def take_limbo(self) -> list[Received]:
        """What was unacknowledged when the last connection dropped (the next CONNACK tells
        whether the broker re-sends it)."""
        limbo, self.limbo = self.limbo, []
        return limbo

    def connection_lost(self) -> None:
        # Messages not yet made durable go to limbo: whether the broker re-sends them is
        # known only from the next CONNACK. QoS 0 ones are never re-sent: keep them batched.
        for cls, batch in list(self._batches.items()):
            keep = [r for r in batch.records if r.qos == 0]
            self.limbo.extend(r for r in batch.records if r.qos > 0)
            if keep:
                batch.records = keep
                batch.nbytes = sum(len(r.payload) + len(r.topic) for r in keep)
            else:
                del self._batches[cls]
        self._acks.clear()  # nothing of that connection can be acknowledged any more
        self.paho = None

    def class_for(self, topic: str) -> str:
        """The class of the first subscription (in config order) whose filter matches."""
        cls = self._class_of.get(topic)
        if cls is None:
            cls = next((s.priority for s in self.settings.subscriptions
                        if paho.topic_matches_sub(s.topic, topic)), "normal")
            if len(self._class_of) > 10_000:  # many distinct topics: keep memory bounded
                self._class_of.clear()
            self._class_of[topic] = cls
        return cls

    @property
    def pending(self) -> int:
        """Messages received and not yet in a batch being made durable."""
        return sum(len(b.records) for b in self._batches.values()) + len(self.limbo)

    def refuse(self, r: Received) -> None:
        """A message over max_message_size (one MQTT 5 brokers should not have sent, or any in
        3.1.1): logged, counted and acknowledged in its turn, so the broker does not re-send it
        at every reconnect. It is not stored."""
        size, r.payload, r.durable = len(r.payload), b"", True
        self.metrics.mqtt_refused.labels("too_large").inc()
        self._too_large.log(log, logging.WARNING, "mqtt_message_refused",
                            f"MQTT message on {r.topic!r} is {size} bytes, over "
                            f"max_message_size ({self.settings.max_message_bytes}); dropped "
                            "and acknowledged", topic=r.topic, bytes=size,
                            source=self.settings.source)
        if r.qos > 0:
            self._acks.append(r)
            self.ack_ready()

    def add(self, r: Received, *, track_ack: bool) -> None:
        cls = self.class_for(r.topic)
        batch = self._batches.get(cls)
        if batch is None:
            batch = self._batches[cls] = Batch(cls, asyncio.get_running_loop().time())
            self._batch_opened.set()
        batch.records.append(r)
        batch.nbytes += len(r.payload) + len(r.topic)
        if track_ack:
            self._acks.append(r)
        else:
            r.generation = -1  # never acknowledged
        self.metrics.mqtt_messages.labels(cls).inc()
        limits = self.settings.batching_for(cls)
        if batch.nbytes >= limits.max_bytes or len(batch.records) >= limits.max_messages:
            self.seal(cls)
        elif self._open_count() >= self.settings.max_inflight // 2:
            # Half the broker's window waits on open batches: seal them all now, or the
            # broker stops sending until the oldest reaches max_age.
            for name in list(self._batches):
                self.seal(name)

    def _open_count(self) -> int:
        return sum(len(b.records) for b in self._batches.values())

    async def age_ticker(self) -> None:
        while True:
            if not self._batches:  # nothing can age: no wake-ups at all while MQTT is quiet
                self._batch_opened.clear()
                await self._batch_opened.wait()
            await asyncio.sleep(_TICK_S)
            now = asyncio.get_running_loop().time()
            for cls, batch in list(self._batches.items()):
                if now - batch.started >= self.settings.batching_for(cls).max_age_s:
                    self.seal(cls)
            if not self._commits and len(self._acks) >= self.settings.max_inflight * 3 // 4:
                # The window is nearly full of durable messages queued behind an older one
                # in another class's open batch: seal it, or acks wait for its max_age.
                for cls in list(self._batches):
                    self.seal(cls)
            self.metrics.mqtt_pending.set(self.pending)

    def seal(self, cls: str) -> None:
        batch = self._batches.pop(cls, None)
        if batch is None or not batch.records:
            return
        task = asyncio.create_task(self._commit(batch), name=f"mqtt-commit-{cls}")
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    async def _commit(self, batch: Batch) -> None:
        """Make one batch durable (retrying while the quota refuses it), then acknowledge."""
        records = batch.records
        async with self._class_locks[batch.cls], self._commit_slots:
            data: bytes = await self.run_blocking(encode_jsonl, records)
            for r in records:
                r.payload = b""  # in `data` now: hold each message once, not twice
            req = BatchRequest(
                data=data, source=self.settings.source, priority=batch.cls,
                name_prefix=batch_name_prefix(records[0].received_ns), name_suffix=".jsonl",
                mtime_ns=records[-1].received_ns,
                meta={"messages": str(len(records))},
            )
            result = await self._store(req, batch)
        if result is None:
            return
        for r in records:
            r.durable = True
        acked = self.ack_ready()
        self.metrics.mqtt_batches.labels(batch.cls).inc()
        log_event(log, logging.INFO, "mqtt_batch_accepted",
                  f"{len(records)} MQTT messages stored as one object",
                  source=self.settings.source, object=result.object_id, bytes=result.size,
                  messages=len(records), acked=acked, **{"class": batch.cls})

    async def _store(self, req: BatchRequest, batch: Batch) -> IngestResult | None:
        """Store one batch, retrying while the quota or the disk refuses it; None when the
        daemon stops first (not acknowledged, so the broker re-sends it: nothing is lost)."""
        delay, refused_logged = 0.5, False
        what = {"source": self.settings.source, "class": batch.cls}
        while True:
            try:
                return await self.ingest_batch(req)
            except QuotaExceededError as e:
                # Not acknowledged: the broker stops sending once its window is full,
                # which is the back-pressure the quota asks for.
                if not refused_logged:
                    refused_logged = True
                    log_event(log, logging.WARNING, "ingest_refused",
                              f"MQTT batch of {len(batch.records)} messages not accepted: {e}",
                              **what)
            except SkyferryError as e:
                self.metrics.errors.labels("mqtt_ingest").inc()
                log_event(log, logging.ERROR, "ingest_failed",
                          f"MQTT batch could not be stored: {e}; retrying", **what)
            if self.stop.is_set():
                log_event(log, logging.WARNING, "mqtt_batch_left",
                          f"stopping: MQTT batch of {len(batch.records)} messages not stored "
                          "and not acknowledged; the broker re-sends it", **what)
                return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stop.wait()
            delay = min(30.0, delay * 2)

    def ack_ready(self) -> int:
        """Acknowledge, in arrival order, every message that is durable; returns how many."""
        acked = 0
        while self._acks and self._acks[0].durable:
            r = self._acks.popleft()
            if self.paho is not None and r.generation == self.generation:
                self.paho.ack(r.mid, r.qos)
                acked += 1
        if acked and self.paho is not None:
            self.paho.flush()
            self.metrics.mqtt_acked.inc(acked)
        return acked

    async def finish(self) -> None:
        """Seal every open batch (and limbo), wait until durable, acknowledge what we can."""
        for r in self.limbo:
            self.add(r, track_ack=False)
        self.limbo = []
        for cls in list(self._batches):
            self.seal(cls)
        await self.settle()

    async def settle(self) -> None:
        """Wait for every commit under way, then acknowledge what became durable.

        A cancel (the daemon's stop deadline, a task group ending) does not cut this short: a
        batch that is committed must be acknowledged on its connection before that closes, or
        the broker re-sends it at the next start and it is stored twice. A commit is bounded
        (a batch is at most max_bytes plus one message of max_message_size, compressed at
        level BATCH_MAX_LEVEL or lower), and at a stop a refused one is left, not retried.
        """
        cancelled = False
        while self._commits:
            try:
                await asyncio.shield(asyncio.gather(*list(self._commits),
                                                    return_exceptions=True))
            except asyncio.CancelledError:
                cancelled = True
                self.stop.set()  # a refused commit must not retry
        self.ack_ready()
        if cancelled:
            raise asyncio.CancelledError
