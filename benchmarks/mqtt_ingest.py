"""MQTT ingest throughput: messages per second from a private Mosquitto into the durable queue.

Two runs on a throw-away site (keys, local-folder cloud, a Mosquitto of its own):

- **live**: the agent is connected while a publisher sends N QoS 1 messages on 20 topics as
  fast as the broker takes them; the rate is N over the time from the first publish to the
  last message made durable and acknowledged (here the Python publisher is usually the limit);
- **backlog**: N messages wait at the broker (the agent was away); the agent starts and the
  rate is N over the time from its MQTT connection to the last message durable. This is the
  agent's own ingest rate.

    python -m benchmarks.mqtt_ingest [--messages 50000] [--no-write]

writes the `<!-- mqtt_ingest -->` section of benchmarks/RESULTS.md (only that section).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tests.kits.mqtt import Broker, Publisher
from tests.kits.site import Site

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TOPICS = [f"bench/t{i:02d}" for i in range(20)]
START, END = "<!-- mqtt_ingest -->", "<!-- /mqtt_ingest -->"


@dataclass(frozen=True)
class Run:
    name: str
    messages: int
    seconds: float
    objects: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def _durable(site: Site) -> tuple[int, int]:
    """(messages made durable, batches) from the agent's log."""
    events = [e for e in site.log_events() if e.get("event") == "mqtt_batch_accepted"]
    return sum(int(e.get("messages", 0)) for e in events), len(events)


def _connected_at(site: Site) -> float | None:
    for e in site.log_events():
        if e.get("event") == "mqtt_connected":
            return datetime.fromisoformat(e["ts"]).timestamp()
    return None


def _last_batch_at(site: Site) -> float:
    last = [e for e in site.log_events() if e.get("event") == "mqtt_batch_accepted"][-1]
    return datetime.fromisoformat(last["ts"]).timestamp()


def _site(root: Path, broker: Broker) -> Site:
    return Site(root, extra={
        "mqtt": {"port": broker.port, "subscribe": [{"topic": "bench/#", "qos": 1}],
                 "batch": {"max_age": "0.5s"}, "status": {"publish": False,
                                                          "commands": False}},
        "telemetry": {"metrics_listen": "off", "log_level": "info"},
    })


def _wait(site: Site, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while _durable(site)[0] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {_durable(site)[0]} of {n} durable\n{site.log_tail()}")
        if site.proc is not None and site.proc.poll() is not None:
            raise RuntimeError(f"agent exited\n{site.log_tail()}")
        time.sleep(0.05)


def live(root: Path, per_topic: int) -> Run:
    broker = Broker(root / "broker")
    broker.start()
    site = _site(root / "site", broker)
    try:
        site.start()
        while _connected_at(site) is None:
            time.sleep(0.05)
        total = per_topic * len(TOPICS)
        t0 = time.time()
        pub = Publisher(broker.port, TOPICS, per_topic, client_id="bench-live").start()
        _wait(site, total)
        elapsed = _last_batch_at(site) - t0
        pub.done.wait(60)
        pub.close()
        return Run("live (publisher and agent together)", total, elapsed, _durable(site)[1])
    finally:
        site.close()
        broker.kill()


def backlog(root: Path, per_topic: int) -> Run:
    broker = Broker(root / "broker")
    broker.start()
    site = _site(root / "site", broker)
    try:
        site.start()  # once, to create the session and its subscription
        while _connected_at(site) is None:
            time.sleep(0.05)
        site.stop()
        total = per_topic * len(TOPICS)
        pub = Publisher(broker.port, TOPICS, per_topic, client_id="bench-backlog").start()
        pub.done.wait(600)
        pub.close()
        site.log_path.unlink()
        site.start()
        _wait(site, total)
        connected = _connected_at(site)
        assert connected is not None
        return Run("backlog (queued at the broker, agent starts)", total,
                   _last_batch_at(site) - connected, _durable(site)[1])
    finally:
        site.close()
        broker.kill()


def section(runs: list[Run]) -> str:
    rows = "\n".join(f"| {r.name} | {r.messages:,} | {r.seconds:.2f} | {r.rate:,.0f} | "
                     f"{r.objects} |" for r in runs)
    return (
        f"{START}\n## MQTT ingest\n\n"
        f"`python -m benchmarks.mqtt_ingest` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} cores), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: QoS 1 messages "
        "(~100 bytes, 20 topics) from a private Mosquitto, each acknowledged only once durable "
        "(fsynced chunk and manifest, committed index row). Default batching except "
        "max_age 0.5 s.\n\n"
        "| run | messages | seconds | messages/s | objects |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        f"{rows}\n{END}"
    )


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace only our section, creating the file (or the section) if missing."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _m: text, old) if pattern.search(old) else (
        old.rstrip("\n") + "\n\n" + text)
    path.write_text(new.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = ap.parse_args(argv)
    per_topic = max(1, args.messages // len(TOPICS))
    with tempfile.TemporaryDirectory(prefix="skyferry-mqtt-bench-") as tmp:
        runs = [live(Path(tmp) / "live", per_topic), backlog(Path(tmp) / "backlog", per_topic)]
    text = section(runs)
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
