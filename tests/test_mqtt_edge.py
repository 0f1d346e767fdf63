"""MQTT at its edges (issue 13, acceptance 5): idle CPU, clean stops, oversize messages,
broker restarts, signed commands.

Each test runs the real daemon against its own Mosquitto (tests/mqttkit.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.mqttkit import Broker, Publisher, check_sequences, read_restored_messages
from tests.sitekit import Site, wait_for

TOPICS = [f"seq/t{i:02d}" for i in range(10)]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def durable(site: Site) -> int:
    return sum(int(e.get("messages", 0)) for e in site.log_events()
               if e.get("event") == "mqtt_batch_accepted")


def connections(site: Site) -> int:
    return sum(1 for e in site.log_events() if e.get("event") == "mqtt_connected")


def mqtt_site(make_site: Callable[..., Site], broker: Broker, **mqtt_extra: Any) -> Site:
    extra = mqtt_extra.pop("site_extra", {})
    conf = {"port": broker.port, "keepalive": "5s", "reconnect_initial": "0.2s",
            "reconnect_max": "1s",
            "subscribe": [{"topic": "seq/#", "qos": 1, "priority": "normal"}],
            "status": {"publish": False, "commands": False}, **mqtt_extra}
    return make_site(extra={"mqtt": conf, "telemetry": {"metrics_listen": "off"}, **extra})


def start_and_connect(site: Site) -> None:
    before = connections(site)
    site.start()
    wait_for(lambda: connections(site) > before, 30, "the MQTT connection", site)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def non_json_lines(site: Site) -> list[str]:
    """What the daemon wrote that is not a JSON log line: tracebacks land here."""
    out = []
    for line in site.log_path.read_text(errors="replace").splitlines():
        try:
            json.loads(line)
        except ValueError:
            out.append(line)
    return out


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.kill()


# ---- no busy loop, no teardown traceback --------------------------------------------------------


def test_idle_after_10000_messages_and_sigterm_without_traceback(
        make_site: Callable[..., Site], broker: Broker) -> None:
    site = mqtt_site(make_site, broker, batch={"max_age": "0.2s"})
    start_and_connect(site)
    pub = Publisher(broker.port, TOPICS, 1000).start()
    try:
        assert pub.done.wait(120) and pub.error is None, pub.error
        wait_for(lambda: durable(site) >= 10_000, 60, "10,000 durable messages", site)
    finally:
        pub.close()
    assert site.proc is not None
    time.sleep(1.0)  # the last acknowledgements and log lines
    before, t0 = cpu_seconds(site.proc.pid), time.monotonic()
    time.sleep(10.0)
    used = cpu_seconds(site.proc.pid) - before
    share = used / (time.monotonic() - t0)
    print(f"idle after 10,000 messages: {share:.2%} of a core ({used:.2f} s CPU in 10 s)")
    assert share <= 0.02, f"the idle daemon used {share:.1%} of a core"
    assert site.stop() == 0
    stray = non_json_lines(site)
    assert not stray, "\n".join(stray[:20])
    assert not [e for e in site.log_events() if e.get("level") in ("error", "critical")]
