"""A private Mosquitto per test (so a test may kill or restart it) and a sequence publisher."""

from __future__ import annotations

import json
import os
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

from tests.sitekit import free_port

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
    in a thread; `done` is set once the broker acknowledged every one of them."""

    def __init__(self, port: int, topics: list[str], per_topic: int,
                 client_id: str = "seq-publisher", rate: float | None = None) -> None:
        self.topics = topics
        self.per_topic = per_topic
        self.rate = rate  # messages per second, None: as fast as the broker takes them
        self.published = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=False)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.acked = 0
        self._acked_lock = threading.Lock()
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0
        self.finished = 0.0

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.started = time.monotonic()
            n = 0
            for seq in range(self.per_topic):
                for t in self.topics:
                    self.client.publish(t, seq_payload(t, seq), qos=1)
                    n += 1
                    self.published = n
                    if self.rate:
                        lag = self.started + n / self.rate - time.monotonic()
                        if lag > 0:
                            time.sleep(lag)
            # Counted from PUBACKs rather than wait_for_publish(): a message published while
            # the broker restarts is kept by paho and sent after it reconnects.
            total = len(self.topics) * self.per_topic
            deadline = time.monotonic() + 120
            while self.acked < total:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"broker acknowledged {self.acked} of {total}")
                time.sleep(0.01)
            self.finished = time.monotonic()
            self.done.set()
        except BaseException as e:  # surfaced by the test
            self.error = e
            self.done.set()

    def _on_publish(self, *_args: Any) -> None:
        with self._acked_lock:
            self.acked += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


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
