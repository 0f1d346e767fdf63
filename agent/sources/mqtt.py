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
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
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
from agent.host.blocking import RunBlocking
from agent.host.memory import fix_malloc_thresholds
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.sources.mqtt_batches import IngestBatch, MqttBatches
from agent.sources.mqtt_records import Received

log = logging.getLogger("skyferry.mqtt")
# Room for a PUBLISH's own header (topic up to 64 KiB, properties) beyond the payload limit;
# a payload that slips through within it is refused (agent/sources/mqtt_batches.py).
PACKET_OVERHEAD = 128 << 10


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
        self._client_now: aiomqtt.Client | None = None
        self._stop = asyncio.Event()
        self.batches = MqttBatches(settings, ingest_batch, run_blocking, metrics, self._stop)
        self._stopped = asyncio.Event()
        self.last_error: str | None = None
        self._last_received_ns = 0

    @property
    def generation(self) -> int:
        """How many connections were made: the current one's number."""
        return self.batches.generation

    def class_for(self, topic: str) -> str:
        return self.batches.class_for(topic)

    @property
    def pending(self) -> int:
        """Messages received and not yet in a batch being made durable."""
        return self.batches.pending

    # ---- the connection loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, consume, reconnect with backoff; returns once `drain` has finished."""
        fix_malloc_thresholds()  # peak memory per message: see agent/host/memory.py
        tick = asyncio.create_task(self.batches.age_ticker(), name="mqtt-batch-ages")
        try:
            # A broker problem never takes the daemon down: it is logged and retried.
            await keep_connected(self._connection, self._stop, self.settings.reconnect_initial_s,
                                 self.settings.reconnect_max_s, self._lost_connection)
            await self.batches.finish()
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
            self.batches.generation += 1
            self.batches.paho = paho_access
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
            await self.batches.settle()  # commits under way are acknowledged before the close
            raise
        finally:
            stop.cancel()
            subscribe.cancel()
            if not consume.done():
                consume.cancel()
        if broker_gone:
            consume.result()  # raises MqttError when the broker went away
        await self.batches.finish()  # stopping: make everything durable and acknowledge it

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        if not self.settings.subscriptions:
            return
        topics = [(s.topic, min(s.qos, 1)) for s in self.settings.subscriptions]
        # The SUBACK comes after whatever the broker queued for a kept session: wait long.
        granted = await client.subscribe(topics, timeout=max(60.0, 4 * self.settings.keepalive_s))
        taken = []
        for (topic, _), code in zip(topics, granted, strict=False):
            value = code if isinstance(code, int) else int(cast(ReasonCode, code).value)
            if value >= 0x80:
                log_event(log, logging.ERROR, "mqtt_subscribe_refused",
                          f"the broker refused the subscription to {topic!r} (code {value}); "
                          "check its ACL for this user", topic=topic)
            else:
                taken.append(topic)
        # From here on the broker routes these topics to this session: a message published
        # before this line, on a first connection, was never ours (MQTT keeps no history).
        log_event(log, logging.INFO, "mqtt_subscribed",
                  f"subscribed to {len(taken)} of {len(topics)} topic filters",
                  topics=taken, generation=self.generation)

    def _on_connect(self, session_present: bool) -> None:
        s = self.settings
        log_event(log, logging.INFO, "mqtt_connected",
                  f"connected to MQTT broker {s.host}:{s.port}", client_id=s.client_id,
                  session_present=session_present, generation=self.generation)
        limbo = self.batches.take_limbo()
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
            self.batches.add(r, track_ack=False)

    def _lost_connection(self, e: BaseException) -> None:
        if self.generation and not self._stop.is_set():
            self.metrics.mqtt_reconnects.inc()
        self.last_error = str(e) or type(e).__name__
        self.metrics.errors.labels("mqtt").inc()
        log_event(log, logging.WARNING, "mqtt_disconnected",
                  f"MQTT broker {self.settings.host}:{self.settings.port} unavailable: "
                  f"{self.last_error}; retrying", pending=self.pending)
        self.batches.connection_lost()

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            payload = msg.payload
            if not isinstance(payload, bytes | bytearray):
                payload = str(payload).encode()
            r = Received(str(msg.topic), bytes(payload), msg.qos, bool(msg.retain),
                         self._receive_time_ns(), msg.mid, self.generation)
            del msg, payload  # the payload lives on only in `r`
            self.batches.receive(r)

    def _receive_time_ns(self) -> int:
        """Wall-clock time of a message, never before the previous one's: batch names (which
        sort in arrival order) and `received` times keep their order through a clock stepped
        back (NTP, a GPS fix), advancing a microsecond (the names' resolution) a message until
        the clock catches up."""
        self._last_received_ns = max(time.time_ns(), self._last_received_ns + 1000)
        return self._last_received_ns

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
        self.batches.reconfigure(new)
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

    async def drain(self) -> None:
        """Stop receiving; return once every received message is durable (and acknowledged
        where the connection still stands)."""
        self._stop.set()
        await self._stopped.wait()
