"""Events downstream: each landed file's event to an MQTT topic (QoS 1) and/or an HTTP webhook.

At least once: the pending marker a lander writes before a landing record
(agent/cloud/land_book.py) is removed only after the record's events are in the events object
*and* posted here. A lander stopped before that leaves the marker, and recovery
(agent/cloud/land_recover.py) posts the events again. A receiver may so see an event twice;
each has a unique "id" to drop the second by.

Posting runs beside landing (one task, a bounded queue): a webhook or broker that is down
slows nothing until the queue is full, and each batch is retried with backoff until it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from tenacity import AsyncRetrying, retry_if_exception_type

from agent.backends.protocol import Backend
from agent.backends.retry import backoff, retrying
from agent.config.secrets import read_secret
from agent.config.settings import SecretRef
from agent.errors import ObjectNotFoundError, SkyferryError

log = logging.getLogger("skyferry.land")
QUEUE_DEPTH = 64  # batches waiting to be posted before landing waits for them
Event = dict[str, Any]


class PostError(SkyferryError):
    """A webhook or broker did not take a batch of events (retried)."""


@dataclass(frozen=True)
class DownstreamSettings:
    """[events] in land.toml."""

    mqtt: str | None = None  # mqtt://host:port or mqtts://host:port
    mqtt_topic: str = "skyferry/landed"
    mqtt_username: str | None = None
    mqtt_password: SecretRef | None = None
    webhook: str | None = None  # http(s)://...: each batch POSTed as a JSON array
    webhook_token: SecretRef | None = None  # sent as "Authorization: Bearer <token>"
    timeout_s: float = 10.0
    retry_max_s: float = 60.0

    @property
    def enabled(self) -> bool:
        return bool(self.mqtt or self.webhook)


class Downstream:
    """Posts batches of events in the background; `submit` waits only when QUEUE_DEPTH are
    waiting. Use as an async context manager: leaving it abandons what is not posted yet (its
    markers stay; recovery posts it)."""

    def __init__(self, settings: DownstreamSettings, dest: Backend,
                 environ: Mapping[str, str] | None = None) -> None:
        self.settings, self.dest = settings, dest
        self._environ = os.environ if environ is None else environ
        self._queue: asyncio.Queue[tuple[list[Event], str | None]] = asyncio.Queue(QUEUE_DEPTH)
        self._task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()
        self._mqtt: Any = None  # aiomqtt.Client while connected
        self._http: Any = None  # aiohttp.ClientSession
        self.posted = 0  # events posted (each target), for the report and tests

    async def __aenter__(self) -> Downstream:
        self._task = asyncio.create_task(self._run(), name="land-events")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._disconnect()
        if self._http is not None:
            await self._http.close()

    async def submit(self, lines: list[Event], marker: str | None) -> None:
        """Post `lines`, then remove `marker` (the pending marker of their landing record)."""
        await self._queue.put((lines, marker))

    async def drain(self) -> None:
        """Wait until everything submitted is posted (`--once` before it exits)."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            lines, marker = await self._queue.get()
            try:
                await self._post_until_taken(lines)
                if marker is not None:
                    await forget(self.dest, marker)
            finally:
                self._queue.task_done()

    async def _post_until_taken(self, lines: list[Event]) -> None:
        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(PostError),
                wait=backoff(0.5, self.settings.retry_max_s), reraise=True,
                before_sleep=lambda s: log.warning(
                    "events not posted, will retry: %s", s.outcome and s.outcome.exception(),
                    extra={"event": "land_events_retry"})):
            with attempt:
                await self.post(lines)

    async def post(self, lines: list[Event]) -> None:
        """One attempt at each target; PostError when one did not take them."""
        if self.settings.webhook:
            await self._post_webhook(lines)
        if self.settings.mqtt:
            await self._publish_mqtt(lines)
        self.posted += len(lines)

    async def _post_webhook(self, lines: list[Event]) -> None:
        import aiohttp

        s = self.settings
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.timeout_s))
        headers = {"Content-Type": "application/json"}
        if s.webhook_token is not None:
            token = read_secret(s.webhook_token, self._environ, "webhook token")
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps(lines, ensure_ascii=False).encode()
        try:
            async with self._http.post(s.webhook, data=body, headers=headers) as r:
                if r.status >= 300:
                    raise PostError(f"webhook {s.webhook} answered {r.status}")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PostError(f"webhook {s.webhook}: {e or type(e).__name__}") from None

    async def _publish_mqtt(self, lines: list[Event]) -> None:
        import aiomqtt

        try:
            client = self._mqtt or await self._connect()
            for event in lines:
                payload = json.dumps(event, ensure_ascii=False, sort_keys=True)
                await asyncio.wait_for(
                    client.publish(self.settings.mqtt_topic, payload, qos=1),
                    self.settings.timeout_s)
        except (aiomqtt.MqttError, TimeoutError, OSError) as e:
            await self._disconnect()
            raise PostError(f"MQTT {self.settings.mqtt}: {e or type(e).__name__}") from None

    async def _connect(self) -> Any:
        import aiomqtt

        s = self.settings
        parts = urlsplit(s.mqtt or "")
        secure = parts.scheme == "mqtts"
        password = (read_secret(s.mqtt_password, self._environ, "MQTT password")
                    if s.mqtt_password is not None else None)
        client = aiomqtt.Client(
            parts.hostname or "localhost", parts.port or (8883 if secure else 1883),
            username=s.mqtt_username or (unquote(parts.username) if parts.username else None),
            password=password, timeout=s.timeout_s,
            tls_context=ssl.create_default_context() if secure else None)
        self._mqtt = await self._stack.enter_async_context(client)
        return self._mqtt

    async def _disconnect(self) -> None:
        self._mqtt = None
        with contextlib.suppress(Exception):
            await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()


async def forget(dest: Backend, key: str) -> None:
    """Remove a marker; one another worker's recovery removed first is fine."""
    with contextlib.suppress(ObjectNotFoundError):
        await retrying(lambda: dest.delete(key))
