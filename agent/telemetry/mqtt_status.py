"""MQTT out: retained status, per-object delivery events, and commands in.

Topics (prefix `skyferry` by default, `[mqtt.status] topic_prefix`):
    <prefix>/<site>/status   retained JSON: queue, gate, link, next window; `offline` as the
                             will when the agent vanishes, `stopped` after a clean stop
    <prefix>/<site>/events   JSON per event: queued, sent, committed, evicted, command
    <prefix>/<site>/cmd      signed commands in (agent/telemetry/commands.py, command_auth.py)

A connection of its own (client id `<client_id>-status`, clean session): status must flow even
when the ingest session is backed up, and commands must not wait behind thousands of messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiomqtt

from agent.broker.connection import read_secret, tls_context
from agent.broker.paho_adapter import fix_write_watch
from agent.broker.reconnect import keep_connected
from agent.config.settings import MqttSettings
from agent.obs.events import EventTap
from agent.obs.logs import iso, log_event
from agent.telemetry.commands import Commands
from agent.telemetry.snapshot import Snapshot

log = logging.getLogger("skyferry.mqtt.status")
_EVENT_BACKLOG = 10_000


class MqttStatus:
    def __init__(self, settings: MqttSettings, site: str, commands: Commands,
                 snapshot: Callable[[], Snapshot | None], tap: EventTap,
                 environ: Mapping[str, str],
                 refresh: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.settings = settings
        self.site = site
        self.commands = commands
        self.snapshot = snapshot
        self.tap = tap
        self.environ = environ
        self.refresh = refresh  # re-take the snapshot so a command shows in the next status
        base = f"{settings.status.topic_prefix}/{site}"
        self.status_topic = f"{base}/status"
        self.events_topic = f"{base}/events"
        self.cmd_topic = f"{base}/cmd"
        self.connected = False
        self.dropped_events = 0
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_EVENT_BACKLOG)
        self._poke = asyncio.Event()
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- feeding --------------------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        """Tap listener: may be called from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing: drop it
                self._loop.call_soon_threadsafe(self._enqueue, event)

    def _enqueue(self, event: dict[str, Any]) -> None:
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped_events += 1

    def poke(self) -> None:
        """Something changed (gate, pause): publish the status now rather than at the tick."""
        self._poke.set()

    # ---- the connection -------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.settings.status.publish:
            self.tap.listeners.append(self._on_event)
        try:
            # The broker being away must not stop the agent: it is logged and retried.
            await keep_connected(self._connection, self._stop, self.settings.reconnect_initial_s,
                                 self.settings.reconnect_max_s, self._lost_connection)
        finally:
            self._finished.set()
            with contextlib.suppress(ValueError):
                self.tap.listeners.remove(self._on_event)

    def _lost_connection(self, e: Exception) -> None:
        log_event(log, logging.DEBUG, "mqtt_status_disconnected",
                  f"status connection to the broker lost: {e}")

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        password = read_secret(s.password, self.environ) if s.password else None
        will = aiomqtt.Will(self.status_topic, json.dumps({"site": self.site,
                                                           "state": "offline"}),
                            qos=1, retain=True)
        return aiomqtt.Client(
            s.host, s.port, identifier=f"{s.client_id}-status", username=s.username,
            password=password, will=will, keepalive=int(s.keepalive_s),
            timeout=max(5.0, s.keepalive_s), tls_context=tls_context(s),
            tls_insecure=bool(s.tls and s.tls.insecure) or None,
            protocol=(aiomqtt.ProtocolVersion.V5 if s.protocol == "5"
                      else aiomqtt.ProtocolVersion.V311),
            logger=logging.getLogger("skyferry.mqtt.paho"),
        )

    async def _connection(self) -> None:
        client = self._client()
        fix_write_watch(client)
        async with asyncio.timeout(max(10.0, 2 * self.settings.keepalive_s)):
            await client.__aenter__()
        self.connected = True
        try:
            # Subscribed even when commands are disabled, so ignored commands are logged.
            await client.subscribe(self.cmd_topic, qos=1)
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._commands_in(client)),
                         tg.create_task(self._status_out(client))]
                await self._stop.wait()
                for t in tasks:
                    t.cancel()
            if self.settings.status.publish:
                await client.publish(self.status_topic, self._status_payload("stopped"), qos=1,
                                     retain=True)
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    async def _commands_in(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            if str(msg.topic) != self.cmd_topic:
                continue
            payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else str(
                msg.payload).encode()
            answer = await self.commands.apply(bytes(payload))
            if self.refresh is not None:
                await self.refresh()
            self.poke()
            if self.settings.status.publish:
                answer["ts"] = iso(time.time())
                await client.publish(self.events_topic, json.dumps(answer), qos=1)

    async def _status_out(self, client: aiomqtt.Client) -> None:
        if not self.settings.status.publish:
            await asyncio.Event().wait()
        last = ""
        loop = asyncio.get_running_loop()
        next_status = loop.time()
        while True:
            now = loop.time()
            if now >= next_status or self._poke.is_set():
                self._poke.clear()
                payload = self._status_payload("running")
                # Retained, so a dashboard that connects later sees the state at once.
                if payload != last or now >= next_status:
                    await client.publish(self.status_topic, payload, qos=1, retain=True)
                    last = payload
                next_status = now + self.settings.status.interval_s
            while not self._events.empty():
                await client.publish(self.events_topic, json.dumps(self._events.get_nowait()),
                                     qos=1)
            get = asyncio.create_task(self._events.get())
            poke = asyncio.create_task(self._poke.wait())
            try:
                done, _ = await asyncio.wait(
                    {get, poke}, timeout=max(0.0, next_status - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED)
            finally:
                poke.cancel()
                if not get.done():
                    get.cancel()
            if get in done:
                await client.publish(self.events_topic, json.dumps(get.result()), qos=1)

    def _status_payload(self, state: str) -> str:
        snap = self.snapshot()
        out: dict[str, Any] = {"site": self.site, "state": state}
        if snap is not None:
            nxt = snap.seconds_to_next()
            out.update({
                "time": iso(snap.time),
                "queue": {
                    "objects": snap.queued_items, "bytes": snap.queued_bytes,
                    "by_class": {c.name: {"objects": c.queued_items, "bytes": c.queued_bytes,
                                          "oldest_age_s": c.oldest_queued_age_s}
                                 for c in snap.classes},
                },
                "gate": {"state": snap.gate_state, "open": snap.gate_open,
                         "paused": snap.paused, "flushing": snap.flushing},
                "link": {"up": snap.link_up, "throughput_bps": snap.throughput_bps},
                "next_window": None if nxt is None else {
                    "in_s": round(nxt, 1), "at": iso(snap.next_change or 0)},
                "window": None if snap.window is None else {
                    "start": iso(snap.window.start),
                    "end": None if snap.window.end is None else iso(snap.window.end)},
            })
        return json.dumps(out, sort_keys=True)

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Publish the final `stopped` status and disconnect (briefly: the broker may be away)."""
        self._stop.set()
        if self._loop is not None:  # running
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._finished.wait()
