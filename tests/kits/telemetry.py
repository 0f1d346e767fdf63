"""A site's telemetry seen from outside: its Prometheus metrics and its MQTT status, events and
signed commands."""

from __future__ import annotations

import json
import queue
import random
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from agent.telemetry.command_auth import load_operator_private, sign_command


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):  # the Prometheus text parser
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Watcher:
    """A plain MQTT client that records status and events and can send commands."""

    def __init__(self, port: int, site_id: str, key: Path | None = None) -> None:
        self.base = f"skyferry/{site_id}"
        self.site_id = site_id
        # Commands are signed with this operator key (the site trusts its public half).
        self.key = None if key is None else load_operator_private(key)
        self.status: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.last_status: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"watcher-{random.randrange(1 << 30)}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{self.base}/status", 1), (f"{self.base}/events", 1)])
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        data = json.loads(msg.payload)
        with self._lock:
            if msg.topic.endswith("/status"):
                self.last_status = data
                self.status.put((time.monotonic(), data))
            else:
                self.events.append((time.monotonic(), data))

    def send(self, command: dict[str, Any] | str) -> float:
        body = {"cmd": command} if isinstance(command, str) else command
        assert self.key is not None, "a Watcher made without an operator key cannot send"
        payload = sign_command(self.key, self.site_id, body)
        self.client.publish(f"{self.base}/cmd", payload, qos=1).wait_for_publish(5)
        return time.monotonic()

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], since: float,
                    timeout: float) -> float:
        """When a status matching pred arrived (after `since`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t, data = self.status.get(timeout=0.05)
            except queue.Empty:
                continue
            if t >= since and pred(data):
                return t
        raise AssertionError(f"no matching status in {timeout}s; last {self.last_status}")

    def event_names(self, obj: str | None = None) -> list[str]:
        with self._lock:
            return [e["event"] for _, e in self.events if obj is None or e.get("object") == obj]

    def command_answers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e for _, e in self.events if e["event"] == "command"]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
