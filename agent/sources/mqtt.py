"""MQTT in: subscribe on the site broker, batch messages per class, acknowledge once durable.

How "acknowledge only after durable" is kept
--------------------------------------------
aiomqtt (2.5) drives paho-mqtt from the event loop but always lets paho acknowledge a QoS 1
message as soon as it is read. paho-mqtt 2.2 itself can wait: with `manual_ack` on, a QoS 1
PUBACK is sent only when `ack(mid, 1)` is called. `agent.broker.paho_adapter` (the one module that
reaches into aiomqtt and paho, with its own tests) turns manual acknowledgement on, records the
CONNACK's session-present flag and keeps the socket's write registration right.

QoS 2 is not subscribed to: paho sends PUBREC (after which the broker discards its copy) as
soon as the PUBLISH arrives, before the message could be made durable. Subscriptions are at
QoS 1 at most, so QoS 2 publications are delivered to us as QoS 1 and acknowledged (PUBACK)
only once durable; the price is a possible duplicate after a crash, never a loss.

The broker keeps unacknowledged and new messages while the agent is away because the client id
is fixed and the session persists (`clean_session=False` in 3.1.1; in 5, `clean_start=False`
with a session expiry). In MQTT 5 the agent also sets Receive Maximum to `max_inflight`, which
is how many unacknowledged messages the broker may have outstanding: a batch can never hold
more (3.1.1 brokers apply their own `max_inflight_messages`, 20 in Mosquitto).

Acknowledgements go out in the order the messages arrived (MQTT 3.1.1 and 5, section 4.6), and
only on the connection that delivered them: after a reconnect the broker re-sends what was not
acknowledged, and acknowledging an old packet id on the new connection could acknowledge a
different message that reuses it.

Order: within a topic, restore yields messages in the order the broker delivered them, which
MQTT (4.6) makes the order one publisher sent them at one QoS. Batches of a class are made
durable one after another, each in arrival order, and named by their first message's receive
time. A broker re-send after a reconnect can repeat a message later on (at least once); it
never moves the first copy. What the publisher's client itself puts on the wire out of order
(paho-mqtt 2.2 writes a PUBLISH made while its reconnect awaits the CONNACK ahead of the ones it
queued offline; see tests/kits/mqtt.py `Publisher`) reaches the broker, and so skyferry, in that
order: nothing here can restore an order the broker never saw.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.broker.connection import read_secret, tls_context
from agent.broker.paho_adapter import PahoAccess
from agent.broker.reconnect import keep_connected
from agent.config.settings import MqttSettings
from agent.errors import QuotaExceededError, SkyferryError
from agent.host.blocking import RunBlocking
from agent.host.memory import fix_malloc_thresholds
from agent.ingest.requests import BatchRequest, IngestResult
from agent.obs.logs import Throttled, log_event
from agent.obs.metrics import Metrics
from agent.sources.mqtt_records import Received, batch_name_prefix, encode_jsonl

log = logging.getLogger("skyferry.mqtt")
IngestBatch = Callable[[BatchRequest], Awaitable[IngestResult]]
_TICK_S = 0.05
_MAX_COMMITS = 2  # batches being made durable at once: overlaps fsync with receiving
# Room for a PUBLISH's own header (topic up to 64 KiB, properties) beyond the payload limit;
# a payload that slips through within it is refused here (`_refuse`).
PACKET_OVERHEAD = 128 << 10


@dataclass
class _Batch:
    cls: str
    started: float  # loop time of the first message
    records: list[Received] = field(default_factory=list)
    nbytes: int = 0


class MqttSource:
    """Subscribes, batches per class by size/count/age, commits, then acknowledges."""

    def __init__(self, settings: MqttSettings, ingest_batch: IngestBatch,
                 run_blocking: RunBlocking, metrics: Metrics,
                 environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.ingest_batch = ingest_batch
        self.run_blocking = run_blocking
        self.metrics = metrics
        self.environ = environ
        self.connected = False
        self.generation = 0
        # Any client of the broker can send oversize messages: logged in a burst, then
        # summarised (each is still counted and acknowledged).
        self._too_large = Throttled(every_s=10.0, burst=20)
        self._paho: PahoAccess | None = None
        self._client_now: aiomqtt.Client | None = None
        self._batches: dict[str, _Batch] = {}
        self._batch_opened = asyncio.Event()  # the age ticker sleeps while no batch is open
        self._acks: collections.deque[Received] = collections.deque()
        self._limbo: list[Received] = []  # unacked when a connection dropped (see _on_connect)
        self._commits: set[asyncio.Task[None]] = set()
        self._commit_slots = asyncio.Semaphore(_MAX_COMMITS)
        # One commit at a time per class, in sealing order (asyncio.Lock wakes waiters FIFO):
        # batches then become durable in arrival order and acknowledgements are never held
        # behind an older batch of the same class, which keeps duplicates after a crash few.
        self._class_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._class_of: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self.last_error: str | None = None
        self._last_received_ns = 0

    # ---- topics and classes -----------------------------------------------------------------

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
        return sum(len(b.records) for b in self._batches.values()) + len(self._limbo)

    # ---- the connection loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, consume, reconnect with backoff; returns once `drain` has finished."""
        fix_malloc_thresholds()  # peak memory per message: see agent/host/memory.py
        tick = asyncio.create_task(self._age_ticker(), name="mqtt-batch-ages")
        try:
            # A broker problem never takes the daemon down: it is logged and retried.
            await keep_connected(self._connection, self._stop, self.settings.reconnect_initial_s,
                                 self.settings.reconnect_max_s, self._lost_connection)
            await self._finish()
        finally:
            tick.cancel()
            self._stopped.set()

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        v5 = s.protocol == "5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = int(min(s.session_expiry_s, 0xFFFFFFFF))
            props.ReceiveMaximum = s.max_inflight
            # The broker drops (and never sends) a larger message: no memory is spent on it.
            props.MaximumPacketSize = s.max_message_bytes + PACKET_OVERHEAD
        password = read_secret(s.password, self.environ) if s.password else None
        return aiomqtt.Client(
            s.host, s.port, identifier=s.client_id, username=s.username, password=password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY, properties=props,
            keepalive=int(s.keepalive_s), timeout=max(5.0, s.keepalive_s),
            tls_context=tls_context(s), tls_insecure=bool(s.tls and s.tls.insecure) or None,
            logger=logging.getLogger("skyferry.mqtt.paho"),
        )

    async def _connection(self) -> None:
        client = self._client()
        paho_access = PahoAccess(client)
        async with asyncio.timeout(max(10.0, 2 * self.settings.keepalive_s)):
            await client.__aenter__()
        try:
            self.generation += 1
            self._paho = paho_access
            self._client_now = client
            self.connected = True
            self.last_error = None
            self.metrics.mqtt_connected.set(1)
            self._on_connect(paho_access.session_present)
            await self._serve(client)
        finally:
            self.connected = False
            self._client_now = None
            self.metrics.mqtt_connected.set(0)
            with contextlib.suppress(Exception):  # the connection is gone anyway
                await client.__aexit__(None, None, None)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Consume until the broker goes away (MqttError) or a stop (everything received is
        then made durable and acknowledged). Consuming starts before subscribing: a kept
        session's backlog arrives ahead of the SUBACK, and must be taken (and acknowledged)
        meanwhile, or a backlog larger than one timeout's worth is never got past."""
        consume = asyncio.create_task(self._consume(client))
        subscribe = asyncio.create_task(self._subscribe(client))
        stop = asyncio.create_task(self._stop.wait())
        waiting = {consume, subscribe, stop}
        try:
            while not (consume.done() or stop.done()):
                _, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if subscribe.done():
                    subscribe.result()  # a refused or timed-out SUBSCRIBE: reconnect
            broker_gone = consume.done()
        except asyncio.CancelledError:
            consume.cancel()
            await self._settle()  # commits under way are acknowledged before the close
            raise
        finally:
            stop.cancel()
            subscribe.cancel()
            if not consume.done():
                consume.cancel()
        if broker_gone:
            consume.result()  # raises MqttError when the broker went away
        await self._finish()  # stopping: make everything durable and acknowledge it

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        if not self.settings.subscriptions:
            return
        topics = [(s.topic, min(s.qos, 1)) for s in self.settings.subscriptions]
        # The SUBACK comes after whatever the broker queued for a kept session: wait long.
        granted = await client.subscribe(topics, timeout=max(60.0, 4 * self.settings.keepalive_s))
        for (topic, _), code in zip(topics, granted, strict=False):
            value = code if isinstance(code, int) else int(cast(ReasonCode, code).value)
            if value >= 0x80:
                log_event(log, logging.ERROR, "mqtt_subscribe_refused",
                          f"the broker refused the subscription to {topic!r} (code {value}); "
                          "check its ACL for this user", topic=topic)

    def _on_connect(self, session_present: bool) -> None:
        s = self.settings
        log_event(log, logging.INFO, "mqtt_connected",
                  f"connected to MQTT broker {s.host}:{s.port}", client_id=s.client_id,
                  session_present=session_present, generation=self.generation)
        limbo, self._limbo = self._limbo, []
        if not limbo:
            return
        if session_present:
            # The broker kept our session: it re-sends every message we did not acknowledge.
            log_event(log, logging.INFO, "mqtt_redelivery",
                      f"{len(limbo)} unacknowledged messages will be re-sent by the broker",
                      messages=len(limbo))
            return
        # The broker lost the session (restarted without persistence, or it expired): what we
        # hold is the only copy, so it is kept, made durable and never acknowledged.
        log_event(log, logging.WARNING, "mqtt_session_lost",
                  f"broker has no session for {s.client_id}; keeping {len(limbo)} messages "
                  "received before the disconnect", messages=len(limbo))
        for r in limbo:
            self._add(r, track_ack=False)

    def _lost_connection(self, e: BaseException) -> None:
        if self.generation and not self._stop.is_set():
            self.metrics.mqtt_reconnects.inc()
        self.last_error = str(e) or type(e).__name__
        self.metrics.errors.labels("mqtt").inc()
        log_event(log, logging.WARNING, "mqtt_disconnected",
                  f"MQTT broker {self.settings.host}:{self.settings.port} unavailable: "
                  f"{self.last_error}; retrying", pending=self.pending)
        # Messages not yet made durable go to limbo: whether the broker re-sends them is
        # known only from the next CONNACK. QoS 0 ones are never re-sent: keep them batched.
        for cls, batch in list(self._batches.items()):
            keep = [r for r in batch.records if r.qos == 0]
            self._limbo.extend(r for r in batch.records if r.qos > 0)
            if keep:
                batch.records = keep
                batch.nbytes = sum(len(r.payload) + len(r.topic) for r in keep)
            else:
                del self._batches[cls]
        self._acks.clear()  # nothing of that connection can be acknowledged any more
        self._paho = None

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            payload = msg.payload
            if not isinstance(payload, bytes | bytearray):
                payload = str(payload).encode()
            r = Received(str(msg.topic), bytes(payload), msg.qos, bool(msg.retain),
                         self._receive_time_ns(), msg.mid, self.generation)
            del msg, payload  # the payload lives on only in `r`
            if len(r.payload) > self.settings.max_message_bytes:
                self._refuse(r)
            else:
                self._add(r, track_ack=r.qos > 0)

    def _refuse(self, r: Received) -> None:
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
            self._ack_ready()

    def _receive_time_ns(self) -> int:
        """Wall-clock time of a message, never before the previous one's: batch names (which
        sort in arrival order) and `received` times keep their order through a clock stepped
        back (NTP, a GPS fix), advancing a microsecond (the names' resolution) a message until
        the clock catches up."""
        self._last_received_ns = max(time.time_ns(), self._last_received_ns + 1000)
        return self._last_received_ns

    # ---- batching -----------------------------------------------------------------------------

    def _add(self, r: Received, *, track_ack: bool) -> None:
        cls = self.class_for(r.topic)
        batch = self._batches.get(cls)
        if batch is None:
            batch = self._batches[cls] = _Batch(cls, asyncio.get_running_loop().time())
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
            self._seal(cls)
        elif self._open_count() >= self.settings.max_inflight // 2:
            # Half the broker's window waits on open batches: seal them all now, or the
            # broker stops sending until the oldest reaches max_age.
            for name in list(self._batches):
                self._seal(name)

    def _open_count(self) -> int:
        return sum(len(b.records) for b in self._batches.values())

    async def _age_ticker(self) -> None:
        while True:
            if not self._batches:  # nothing can age: no wake-ups at all while MQTT is quiet
                self._batch_opened.clear()
                await self._batch_opened.wait()
            await asyncio.sleep(_TICK_S)
            now = asyncio.get_running_loop().time()
            for cls, batch in list(self._batches.items()):
                if now - batch.started >= self.settings.batching_for(cls).max_age_s:
                    self._seal(cls)
            if not self._commits and len(self._acks) >= self.settings.max_inflight * 3 // 4:
                # The window is nearly full of durable messages queued behind an older one
                # in another class's open batch: seal it, or acks wait for its max_age.
                for cls in list(self._batches):
                    self._seal(cls)
            self.metrics.mqtt_pending.set(self.pending)

    def _seal(self, cls: str) -> None:
        batch = self._batches.pop(cls, None)
        if batch is None or not batch.records:
            return
        task = asyncio.create_task(self._commit(batch), name=f"mqtt-commit-{cls}")
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    async def _commit(self, batch: _Batch) -> None:
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
        acked = self._ack_ready()
        self.metrics.mqtt_batches.labels(batch.cls).inc()
        log_event(log, logging.INFO, "mqtt_batch_accepted",
                  f"{len(records)} MQTT messages stored as one object",
                  source=self.settings.source, object=result.object_id, bytes=result.size,
                  messages=len(records), acked=acked, **{"class": batch.cls})

    async def _store(self, req: BatchRequest, batch: _Batch) -> IngestResult | None:
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
            if self._stop.is_set():
                log_event(log, logging.WARNING, "mqtt_batch_left",
                          f"stopping: MQTT batch of {len(batch.records)} messages not stored "
                          "and not acknowledged; the broker re-sends it", **what)
                return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            delay = min(30.0, delay * 2)

    def _ack_ready(self) -> int:
        """Acknowledge, in arrival order, every message that is durable; returns how many."""
        acked = 0
        while self._acks and self._acks[0].durable:
            r = self._acks.popleft()
            if self._paho is not None and r.generation == self.generation:
                self._paho.ack(r.mid, r.qos)
                acked += 1
        if acked and self._paho is not None:
            self._paho.flush()
            self.metrics.mqtt_acked.inc(acked)
        return acked

    # ---- reloading ----------------------------------------------------------------------------

    def can_update(self, new: MqttSettings) -> bool:
        """True when `new` changes only what `update` applies on the live connection."""
        return dataclasses.replace(
            new, subscriptions=self.settings.subscriptions, batching=self.settings.batching,
            class_batching=self.settings.class_batching, status=self.settings.status,
            source=self.settings.source) == self.settings

    async def update(self, new: MqttSettings) -> None:
        """SIGHUP: new subscriptions and batching on the same connection and session.

        Reconnecting would make the broker re-send what is in flight (duplicates); changing
        subscriptions in place does not. Open batches keep the class they were started in.
        """
        old_topics = {(s.topic, min(s.qos, 1)) for s in self.settings.subscriptions}
        new_topics = {(s.topic, min(s.qos, 1)) for s in new.subscriptions}
        self.settings = new
        self._class_of.clear()
        client = self._client_now
        if client is None:
            return  # the next connection subscribes from the new settings
        gone = sorted({t for t, _ in old_topics} - {t for t, _ in new_topics})
        added = sorted(new_topics - old_topics)
        if gone:
            await client.unsubscribe(gone)
        if added:
            await client.subscribe(added)

    # ---- stopping -----------------------------------------------------------------------------

    async def _finish(self) -> None:
        """Seal every open batch (and limbo), wait until durable, acknowledge what we can."""
        for r in self._limbo:
            self._add(r, track_ack=False)
        self._limbo = []
        for cls in list(self._batches):
            self._seal(cls)
        await self._settle()

    async def _settle(self) -> None:
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
                self._stop.set()  # a refused commit must not retry
        self._ack_ready()
        if cancelled:
            raise asyncio.CancelledError

    async def drain(self) -> None:
        """Stop receiving; return once every received message is durable (and acknowledged
        where the connection still stands)."""
        self._stop.set()
        await self._stopped.wait()
