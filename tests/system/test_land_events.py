# ruff: noqa: F811  (pytest fixtures are imported and then taken as parameters)
"""Events downstream (issue 16): each landed file's event posted to an MQTT topic (QoS 1, a
private Mosquitto) and to an HTTP webhook (a local aiohttp server), at least once, retried with
backoff, each with its unique id; and posted again after a stop before posting."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from tests.kits.mqtt import Broker
from tests.kits.restore import Cloud, cloud, keys, run_cli  # noqa: F401 (fixtures)
from tests.kits.site import free_port, render_toml

TOKEN_ENV = "SKYFERRY_TEST_HOOK_TOKEN"


class Webhook(threading.Thread):
    """An aiohttp server that refuses the first `refuse` POSTs (503), then keeps each body."""

    def __init__(self, refuse: int) -> None:
        super().__init__(daemon=True)
        self.port, self.refuse = free_port(), refuse
        self.bodies: list[list[dict[str, Any]]] = []
        self.auth: set[str] = set()
        self.refused = 0
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None

    async def hook(self, request: web.Request) -> web.Response:
        self.auth.add(request.headers.get("Authorization", ""))
        if self.refused < self.refuse:
            self.refused += 1
            return web.Response(status=503)
        self.bodies.append(await request.json())
        return web.Response(status=204)

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.ready.set()
        await self.stopping.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self.loop is not None and self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.join(10)

    def ids(self) -> list[str]:
        return [e["id"] for body in self.bodies for e in body]


def subscriber(port: int, topic: str, got: list[dict[str, Any]]) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="events-test")
    subscribed = threading.Event()
    c.on_message = lambda _c, _u, m: got.append(json.loads(m.payload))
    c.on_subscribe = lambda *_a: subscribed.set()
    c.on_connect = lambda cl, *_a: cl.subscribe(topic, qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert subscribed.wait(10), "the test's subscriber did not subscribe"
    return c


def event_log(lake: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted((lake / "_skyferry" / "events").rglob("*.jsonl"))
            for line in p.read_text().splitlines()]


def test_events_reach_mqtt_and_a_webhook_at_least_once_with_unique_ids(
        cloud: Cloud, broker: Broker, tmp_path: Path) -> None:
    for i in range(4):
        cloud.publish(f"survey/{i}.txt", f"file {i}".encode())
    cloud.publish_pack([(f"pack/{j}.log", b"x" * (j + 1)) for j in range(3)])
    hook = Webhook(refuse=2)
    hook.start()
    assert hook.ready.wait(10)
    got: list[dict[str, Any]] = []
    sub = subscriber(broker.port, "lake/landed", got)
    lake = tmp_path / "lake"
    cfg = tmp_path / "land.toml"
    cfg.write_text(render_toml({
        "source": {"url": cloud.url}, "dest": {"url": f"file://{lake}"},
        "land": {"key": str(cloud.keys.recipient_key), "work_dir": str(tmp_path)},
        "events": {"mqtt": f"mqtt://127.0.0.1:{broker.port}", "mqtt_topic": "lake/landed",
                   "webhook": f"http://127.0.0.1:{hook.port}/hook",
                   "webhook_token_env": TOKEN_ENV, "retry_max": "2s"}}))
    os.environ[TOKEN_ENV] = "s3cret-token"
    try:
        report = run_cli("land", "-c", str(cfg), "--once", "--json").report
        assert report["files"] == 7, report
        logged = event_log(lake)
        ids = {e["id"] for e in logged}
        assert len(ids) == len(logged) == 7, "one event per file, each with its own id"
        assert hook.refused == 2, "the webhook refused twice: the batch was retried"
        assert set(hook.ids()) == ids and hook.auth == {"Bearer s3cret-token"}
        assert {e["id"] for e in got} == ids, "every event on the MQTT topic"
        assert all(e == next(x for x in logged if x["id"] == e["id"]) for e in got)
        # A lander stopped after its landing record, before posting: the marker it left makes
        # the next run post that record's events again (at least once), and log none twice.
        record = next(p for p in (lake / "_skyferry" / "landed").rglob("*") if p.is_file())
        marker = lake / "_skyferry" / "pending" / cloud.site / f"{record.name}.stopped"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
        posted = len(hook.ids())
        assert run_cli("land", "-c", str(cfg), "--once", "--json").report["files"] == 0
        again = hook.ids()[posted:]
        assert again and set(again) <= ids, "that record's events were posted again"
        assert event_log(lake) == logged and not marker.exists()
    finally:
        os.environ.pop(TOKEN_ENV, None)
        sub.loop_stop()
        sub.disconnect()
        hook.stop()
