"""A private Mosquitto per test (so a test may kill or restart it) and a sequence publisher."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.kits.site import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Broker:
    """`mosquitto -c FILE` on a free port, with a queue deep enough for a long agent outage."""

    root: Path
    port: int = field(default_factory=free_port)
    persistence: bool = False
    extra: str = ""  # appended: more listeners
    head: str = ""  # prepended: global options that must precede listeners
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.root / "mosquitto.conf"

    def write_conf(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # The defaults (1000 queued per client) would drop messages while the agent is
            # killed; a site broker for skyferry is configured the same way (see README).
            "max_queued_messages 0",
            "max_inflight_messages 0",
            f"log_dest file {self.root / 'mosquitto.log'}",
            "log_type error", "log_type warning", "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto`, who cannot write here
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.root}/",
                      "autosave_interval 1"]
        self.conf.write_text(self.head + "\n".join(lines) + "\n" + self.extra)

    def start(self) -> None:
        self.write_conf()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        """A clean stop: with persistence on, the broker saves its sessions and queues."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)


def seq_payload(topic: str, seq: int, pad: int = 60) -> bytes:
    return json.dumps({"topic": topic, "seq": seq, "pad": "x" * pad}).encode()


class Publisher:
    """Publishes `per_topic` QoS 1 messages with sequence numbers on each topic, round robin,
    in a thread; `done` is set once the broker acknowledged every one of them.

    It keeps each topic's order on the wire across broker restarts, as MQTT 4.6 asks of a
    publisher, so the order the agent stores is the order it was published. paho-mqtt 2.2 does
    not by itself: `publish()` called from another thread while a reconnect's CONNECT awaits its
    CONNACK goes straight onto the socket, ahead of the messages paho queued while offline and
    re-sends only once the CONNACK arrives (seen: seq 295 on the wire before 106..294, so the
    broker, and any subscriber, got them in that order). Here one thread runs paho's network
    loop and publishes only while connected, after the CONNACK and its re-sends; what falls due
    meanwhile goes out in order once the connection is back. `wire_problems` lists any
    per-connection reordering paho's own log still shows, to tell a harness fault from an
    agent fault.
    """

    def __init__(self, port: int, topics: list[str], per_topic: int,
                 client_id: str = "seq-publisher", rate: float | None = None) -> None:
        self.topics = topics
        self.per_topic = per_topic
        self.rate = rate  # messages per second, None: as fast as the broker takes them
        self.published = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.wire_problems: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=False)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.acked = 0
        self.client.on_publish = self._on_publish
        self.client.on_log = self._on_log
        self._sending: tuple[str, int] = ("", -1)  # the message publish() is writing now
        self._mid_seq: dict[int, tuple[str, int]] = {}
        self._wire_last: dict[str, int] = {}  # per topic, on the current connection
        self._closing = threading.Event()
        self._retry_at = 0.0
        self._backoff = _RECONNECT_MIN_S
        self.client.connect("127.0.0.1", port, keepalive=10)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0
        self.finished = 0.0

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.started = time.monotonic()
            total = len(self.topics) * self.per_topic
            n = 0
            deadline = None
            while self.acked < total and not self._closing.is_set():
                due = total if self.rate is None else int(
                    (time.monotonic() - self.started) * self.rate) + 1
                # Only while connected: `is_connected()` turns true while paho handles the
                # CONNACK in this thread, after which its re-sends are already queued.
                burst = 0
                while n < min(due, total) and self.client.is_connected() and burst < 100:
                    seq, i = divmod(n, len(self.topics))
                    self._publish(self.topics[i], seq)
                    n += 1
                    burst += 1
                    self.published = n
                if n == total and deadline is None:
                    # Counted from PUBACKs: what is published while the broker restarts is
                    # sent after the reconnect.
                    deadline = time.monotonic() + 120
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"broker acknowledged {self.acked} of {total}")
                self._network(0.0 if n < min(due, total) else 0.002)
            self.finished = time.monotonic()
            self.done.set()
            while not self._closing.is_set():  # answer pings until closed
                self._network(0.1)
        except BaseException as e:  # surfaced by the test
            self.error = e
            self.done.set()

    def _publish(self, topic: str, seq: int) -> None:
        self._sending = (topic, seq)
        info = self.client.publish(topic, seq_payload(topic, seq), qos=1)
        self._mid_seq[info.mid] = (topic, seq)
        self._sending = ("", -1)

    def _network(self, timeout: float) -> None:
        """One turn of paho's loop; reconnect with backoff (as loop_forever would)."""
        if self.client.loop(timeout) == mqtt.MQTT_ERR_SUCCESS:
            if self.client.is_connected():
                self._backoff = _RECONNECT_MIN_S
            return
        now = time.monotonic()
        if now < self._retry_at:
            time.sleep(min(0.01, self._retry_at - now))
            return
        try:
            self.client.reconnect()
        except OSError:
            self._retry_at = now + self._backoff
            self._backoff = min(_RECONNECT_MAX_S, self._backoff * 2)

    def _on_log(self, _c: Any, _u: Any, _level: int, msg: str) -> None:
        if msg.startswith("Sending CONNECT"):
            self._wire_last.clear()
            return
        m = _SENDING_PUBLISH.match(msg)
        if m is None:
            return
        mid = int(m.group(1))
        topic, seq = self._mid_seq.get(mid) or self._sending
        if not topic:
            return
        last = self._wire_last.get(topic, -1)
        if seq <= last:
            self.wire_problems.append(f"{topic}: seq {seq} written after {last} (mid {mid})")
        self._wire_last[topic] = max(seq, last)

    def _on_publish(self, _c: Any, _u: Any, mid: int, *_args: Any) -> None:
        self._mid_seq.pop(mid, None)
        self.acked += 1

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.client.disconnect()


_RECONNECT_MIN_S = 0.05
_RECONNECT_MAX_S = 0.5
_SENDING_PUBLISH = re.compile(r"Sending PUBLISH \(d\d, q\d, r\d, m(\d+)\)")


def read_restored_messages(root: Path) -> Iterator[dict[str, Any]]:
    """Every JSON Lines record below root, files in name order (which is arrival order)."""
    for path in sorted(root.rglob("*.jsonl"), key=lambda p: (str(p.parent), p.name)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def check_sequences(records: Iterator[dict[str, Any]], topics: list[str], per_topic: int
                    ) -> tuple[int, list[str]]:
    """(duplicates, problems): every seq present, in order per topic once repeats are dropped."""
    seen: dict[str, set[int]] = {t: set() for t in topics}
    last: dict[str, int] = {t: -1 for t in topics}
    dups = 0
    problems: list[str] = []
    for r in records:
        body = json.loads(r["payload"])
        t, seq = r["topic"], int(body["seq"])
        if seq in seen[t]:
            dups += 1
            continue
        if seq != last[t] + 1:
            problems.append(f"{t}: seq {seq} after {last[t]}")
        seen[t].add(seq)
        last[t] = seq
    for t in topics:
        if len(seen[t]) != per_topic:
            missing = sorted(set(range(per_topic)) - seen[t])
            problems.append(f"{t}: {len(missing)} missing, first {missing[:5]}")
    return dups, problems
