"""Issue 5, running like a service: sd_notify and the watchdog (acceptance 2), SIGTERM and
SIGHUP, metrics and the status page (acceptance 5), MQTT status and commands (acceptance 6).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.telemetry.command_auth import (
    generate_operator_keys,
)
from tests.kits.mqtt import Broker, free_port
from tests.kits.site import PYTHON, Site, drop_file, render_toml, wait_for
from tests.kits.telemetry import Watcher, scrape, value

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def start(site: Site, **env: str) -> None:
    """Like Site.start, with extra environment (NOTIFY_SOCKET, test hooks)."""
    log = open(site.log_path, "ab")  # noqa: SIM115 - the daemon owns it
    site.proc = subprocess.Popen([PYTHON, "-m", "agent", "run", "-c", str(site.config)],
                                 stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, **env})
    log.close()


def events(site: Site, name: str) -> list[dict[str, Any]]:
    return [e for e in site.log_events() if e.get("event") == name]


def closed_windows() -> dict[str, Any]:
    """A schedule whose only window starts in an hour: nothing is sent unless flushed."""
    start_at = datetime.now(UTC) + timedelta(hours=1)
    return {"mode": "schedule", "intervals": [
        {"start": start_at.isoformat(), "end": (start_at + timedelta(minutes=10)).isoformat(),
         "rate": "10Mbit/s"}]}


# ---- acceptance 2: READY, WATCHDOG at the cadence, and silence while the loop is blocked --------


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def times(self, key: str, since: float = 0.0) -> list[float]:
        return [t for t, f in self.messages if key in f and t >= since]

    def close(self) -> None:
        self.sock.close()


def test_notify_ready_watchdog_cadence_and_blocked_loop(make_site: Callable[..., Site],
                                                        tmp_path: Path) -> None:
    site = make_site(extra={"telemetry": {"metrics_listen": "off"}})
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        start(site, NOTIFY_SOCKET=str(sock.path), WATCHDOG_USEC="400000",
              SKYFERRY_TEST_HOOKS="1", SKYFERRY_TEST_BLOCK_S="2")
        deadline = time.monotonic() + 30
        while not sock.times("READY") and time.monotonic() < deadline:
            sock.pump(0.2)
        ready = sock.times("READY")
        assert ready, f"no READY=1 within 30 s:\n{site.log_tail()}"
        status = next(f["STATUS"] for _, f in sock.messages if "READY" in f)
        assert "queue" in status and "gate" in status, status
        sock.pump(2.0)
        pings = sock.times("WATCHDOG", since=ready[0])
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # WATCHDOG_USEC=0.4 s: the agent pings every 0.2 s.
        assert len(pings) >= 7, pings
        assert 0.15 <= statistics.median(gaps) <= 0.3, gaps
        assert max(gaps) < 0.4, gaps

        blocked_at = time.monotonic()
        os.kill(site.proc.pid, signal.SIGUSR2)  # type: ignore[union-attr]  # test hook: 2 s
        sock.pump(3.5)
        during = [t for t in sock.times("WATCHDOG") if blocked_at + 0.3 < t < blocked_at + 1.9]
        assert not during, "WATCHDOG went on while the event loop was blocked"
        after = sock.times("WATCHDOG", since=blocked_at)
        silence = max(b - a for a, b in zip([blocked_at, *after], after, strict=False))
        assert silence >= 1.7, f"longest silence only {silence:.2f}s"
        assert [t for t in after if t > blocked_at + 2.2], "WATCHDOG did not resume"

        assert site.stop() == 0
        sock.pump(0.3)
        assert sock.times("STOPPING"), "no STOPPING=1"
        print(f"watchdog: median gap {statistics.median(gaps):.3f}s, "
              f"silence while blocked {silence:.2f}s")
    finally:
        sock.close()


def test_no_notify_socket_no_problem(make_site: Callable[..., Site]) -> None:
    from agent.telemetry.notify import Notifier

    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, 4242)
    assert not n.enabled and n.watchdog_s is None and not n.send(READY=1)
    n = Notifier.from_environ({"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "2000000"}, 1)
    assert n.enabled and n.watchdog_s == 2.0
    assert not n.send(READY=1)  # nobody listens: logged once, never raised
    n.close()


# ---- SIGTERM and SIGHUP ------------------------------------------------------------------------


def test_sigterm_abandons_a_long_ingest_quickly_and_loses_nothing(
        make_site: Callable[..., Site], tmp_path: Path) -> None:
    # zstd level 19 on compressible data: an ingest of ~15 s, cut at 1 MiB chunks.
    site = make_site(extra={"compression": {"level": 19},
                            "chunking": {"min_size": "256KiB", "avg_size": "512KiB",
                                         "max_size": "1MiB"},
                            "telemetry": {"metrics_listen": "off"}})
    data = os.urandom(48 << 20).translate(bytes(b % 16 + 65 for b in range(256)))
    drop_file(site.spool(), "big.dat", data)
    site.start()
    wait_for(lambda: bool(events(site, "started")), 30, "start", site)
    time.sleep(1.5)  # well into the ingest
    t0 = time.monotonic()
    assert site.stop() == 0
    took = time.monotonic() - t0
    assert took < 5, f"SIGTERM took {took:.1f}s"
    assert (site.spool() / "big.dat").exists(), "the file left its spool without being queued"
    assert not events(site, "file_accepted")
    # Restarted (fast compression this time), it is taken whole and restores intact.
    site.extra["compression"] = {"level": 1}
    site.write_config()
    site.start()
    site.wait_drained(timeout=120, expect_objects=1)
    site.stop()
    site.restore(tmp_path / "out")
    assert (tmp_path / "out" / site.site_id / "files" / "big.dat").read_bytes() == data
    print(f"SIGTERM during a long ingest: exited in {took:.2f}s")


def test_sighup_applies_windows_and_spools_and_keeps_the_queue(
        make_site: Callable[..., Site], tmp_path: Path) -> None:
    site = make_site(extra={"windows": closed_windows(), "telemetry": {"metrics_listen": "off"}})
    drop_file(site.spool(), "before.txt", b"queued before the reload\n")
    site.start()
    wait_for(lambda: bool(events(site, "file_accepted")), 30, "the first file queued", site)
    time.sleep(1.0)
    assert site.status()["queued_objects"] == 1  # the window is closed: it waits

    site.spools["extra"] = "high"
    site.extra["windows"] = {"mode": "always"}
    site.extra["store"] = {"quota": "10GiB"}  # needs a restart: reported, not applied
    site.write_config()
    drop_file(site.spool("extra"), "new-spool.txt", b"from a spool added by SIGHUP\n")
    os.kill(site.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: bool(events(site, "reloaded")), 10, "the reload", site)
    site.wait_drained(timeout=60, expect_objects=2)
    reloaded = events(site, "reloaded")[0]
    assert set(reloaded["changed"]) == {"windows", "spools"}, reloaded
    assert [e["setting"] for e in events(site, "reload_needs_restart")] == ["store"]
    assert site.proc is not None and site.proc.poll() is None
    assert len(events(site, "started")) == 1  # one process throughout

    # A broken file is refused whole; the agent keeps running on the previous settings.
    site.config.write_text(site.config.read_text() + "\n[bogus]\n")
    os.kill(site.proc.pid, signal.SIGHUP)
    wait_for(lambda: bool(events(site, "reload_failed")), 10, "the refused reload", site)
    assert site.proc.poll() is None
    site.stop()
    site.restore(tmp_path / "out")
    out = tmp_path / "out" / site.site_id
    assert (out / "files" / "before.txt").exists() and (out / "extra" / "new-spool.txt").exists()


# ---- acceptance 5: metrics move, the status page renders ---------------------------------------


SERIES = [
    "skyferry_queue_items", "skyferry_queue_bytes", "skyferry_oldest_queued_age_seconds",
    "skyferry_ingested_bytes_total", "skyferry_sent_bytes_total", "skyferry_resent_bytes_total",
    "skyferry_compression_saved_bytes", "skyferry_dedup_saved_bytes", "skyferry_window_open",
    "skyferry_seconds_to_next_window", "skyferry_link_up", "skyferry_link_rtt_seconds",
    "skyferry_uplink_throughput_bytes_per_second", "skyferry_gate_budget_bytes",
    "skyferry_errors_total", "skyferry_evictions_total", "skyferry_quota_refusals_total",
    "skyferry_quota_used_bytes", "skyferry_forecast_hit_ratio", "skyferry_gate_open",
]


def mqtt_status_site(make_site: Callable[..., Site], broker: Broker, port: int,
                     commands: bool = True) -> Site:
    site = make_site(extra={
        "windows": closed_windows(),
        "mqtt": {"port": broker.port, "reconnect_initial": "0.2s", "keepalive": "5s",
                 "status": {"publish": True, "commands": commands, "interval": "2s"}},
        "telemetry": {"metrics_listen": f"127.0.0.1:{port}"},
    })
    _, public = generate_operator_keys(site.root / "operator")
    site.extra["mqtt"]["status"]["operator_keys"] = [str(public)]
    site.write_config()
    return site


def operator_key(site: Site) -> Path:
    """The private half of the operator key `mqtt_status_site` made the site trust."""
    return site.root / "operator" / "operator.key"


def test_metrics_parse_and_move_as_the_agent_works(make_site: Callable[..., Site],
                                                   broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    site = mqtt_status_site(make_site, broker, port)
    site.start()
    wait_for(lambda: bool(events(site, "metrics_listening")), 30, "the metrics port", site)
    time.sleep(1.2)
    before = scrape(port)
    missing = [s for s in SERIES if not any(k[0].startswith(s) for k in before)]
    assert not missing, f"series not exposed: {missing}"
    assert value(before, "skyferry_queue_items", **{"class": "normal", "state": "queued"}) == 0
    assert value(before, "skyferry_window_open") == 0
    to_next = value(before, "skyferry_seconds_to_next_window")
    assert 3500 < to_next <= 3600

    text = b"compressible telemetry line\n" * 40000  # > 1 MiB: not packed, so dedup shows
    drop_file(site.spool(), "a.log", text)
    drop_file(site.spool(), "b.log", text)  # same content: dedup
    wait_for(lambda: len(events(site, "file_accepted")) == 2, 30, "two files queued", site)
    time.sleep(10.5)  # one savings refresh (every 10 snapshots)
    mid = scrape(port)
    queued = {"class": "normal", "state": "queued"}
    assert value(mid, "skyferry_queue_items", **queued) == 2
    assert value(mid, "skyferry_queue_bytes", **queued) == 2 * len(text)
    assert value(mid, "skyferry_oldest_queued_age_seconds", **{"class": "normal"}) > 5
    assert value(mid, "skyferry_ingested_bytes_total", **{"class": "normal"}) == 2 * len(text)
    assert value(mid, "skyferry_compression_saved_bytes") > len(text) * 0.9
    assert value(mid, "skyferry_dedup_saved_bytes") == len(text)
    assert value(mid, "skyferry_seconds_to_next_window") < to_next
    assert value(mid, "skyferry_quota_used_bytes") > 0

    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
    assert "Queue by class" in page and "next in" in page and "normal" in page
    status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json").read())
    assert status["queued_items"] == 2 and status["gate_state"] == "closed"

    watcher = Watcher(broker.port, site.site_id, operator_key(site))
    try:
        time.sleep(0.5)
        watcher.send({"cmd": "flush"})
        site.wait_drained(timeout=30, expect_objects=2)
        time.sleep(1.5)
    finally:
        watcher.close()
    after = scrape(port)
    assert value(after, "skyferry_queue_items", **queued) == 0
    assert value(after, "skyferry_queue_items", **{"class": "normal", "state": "committed"}) == 2
    assert value(after, "skyferry_sent_bytes_total", kind="chunk") > 0
    assert value(after, "skyferry_committed_objects_total", **{"class": "normal"}) == 2
    assert value(after, "skyferry_commands_total", command="flush", result="applied") == 1
    site.stop()


@pytest.mark.skipif(CHROMIUM is None,
                    reason="chromium is not installed (Debian packages: chromium, "
                           "fonts-dejavu-core)")
def test_status_page_renders_in_headless_chromium(make_site: Callable[..., Site],
                                                  broker: Broker) -> None:
    """The page in headless Chromium: test-artifacts/status-page.png, and the rendered text
    shows the queue and the next window."""
    port = free_port()
    site = mqtt_status_site(make_site, broker, port)
    drop_file(site.spool(), "waiting-1.bin", os.urandom(300_000))
    drop_file(site.spool(), "waiting-2.bin", os.urandom(200_000))
    site.start()
    wait_for(lambda: len(events(site, "file_accepted")) == 2, 30, "two files queued", site)
    time.sleep(1.5)  # a snapshot after the ingest
    assert CHROMIUM is not None
    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "status-page.png"
    png.unlink(missing_ok=True)
    profile = site.root / "chromium-profile"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--window-size=1100,900"]
    url = f"http://127.0.0.1:{port}/"
    r = subprocess.run([*flags, f"--screenshot={png}", url], capture_output=True, timeout=90)
    assert png.exists() and png.stat().st_size > 10_000, r.stderr.decode()[-2000:]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=90).stdout
    assert "Queue by class" in dom and "next in" in dom and "2 objects" in dom, dom[:2000]
    site.stop()


# ---- acceptance 6: commands over MQTT take effect within a second ------------------------------


def test_commands_take_effect_within_a_second(make_site: Callable[..., Site], broker: Broker,
                                              tmp_path: Path) -> None:
    site = mqtt_status_site(make_site, broker, free_port())
    site.start()
    watcher = Watcher(broker.port, site.site_id, operator_key(site))
    try:
        watcher.wait_status(lambda s: s.get("state") == "running", 0, 30)
        drop_file(site.spool(), "wait.txt", b"waits for a window\n")
        wait_for(lambda: bool(events(site, "file_accepted")), 30, "the file queued", site)
        obj = events(site, "file_accepted")[0]["object"]

        sent = watcher.send({"cmd": "priority", "object": obj, "class": "critical"})
        wait_for(lambda: len(watcher.command_answers()) == 1, 5, "the priority answer", site)
        assert watcher.command_answers()[0]["ok"], watcher.command_answers()
        classes = site.status()["classes"]
        assert classes["critical"]["items"].get("queued") == 1, classes

        sent = watcher.send("pause")
        took = watcher.wait_status(lambda s: s["gate"]["paused"], sent, 5) - sent
        assert took < 1.0, f"pause took {took:.2f}s"

        sent = watcher.send({"cmd": "flush"})  # flush also lifts the pause
        # The gate opens at once; a small queue may even be sent before the next status.
        took = watcher.wait_status(lambda s: s["gate"]["state"] == "flushing"
                                   or s["queue"]["objects"] == 0, sent, 5) - sent
        assert took < 1.0, f"flush took {took:.2f}s"
        wait_for(lambda: "committed" in watcher.event_names(obj), 5, "committed event", site)
        site.wait_drained(timeout=30, expect_objects=1)
        assert "sent" in watcher.event_names(obj), watcher.event_names(obj)
        # The flush ends with the queue; the schedule's closed window closes the gate again.
        watcher.wait_status(lambda s: s["gate"]["state"] == "closed", sent, 5)

        sent = watcher.send("pause")
        watcher.wait_status(lambda s: s["gate"]["paused"], sent, 5)
        sent = watcher.send("resume")
        took = watcher.wait_status(lambda s: not s["gate"]["paused"], sent, 5) - sent
        assert took < 1.0, f"resume took {took:.2f}s"

        watcher.send("reboot")
        wait_for(lambda: len(watcher.command_answers()) >= 6, 5, "all answers", site)
        last = watcher.command_answers()[-1]
        assert not last["ok"] and "use one of" in last["detail"]
        assert "queued" in watcher.event_names()
    finally:
        watcher.close()
    site.stop()
    last_status = json.loads(json.dumps(watcher.last_status))
    assert last_status["state"] in ("stopped", "running")


def test_commands_disabled_are_ignored_and_logged(make_site: Callable[..., Site],
                                                  broker: Broker) -> None:
    site = mqtt_status_site(make_site, broker, free_port(), commands=False)
    site.start()
    watcher = Watcher(broker.port, site.site_id, operator_key(site))
    try:
        watcher.wait_status(lambda s: s.get("state") == "running", 0, 30)
        sent = watcher.send("pause")
        wait_for(lambda: bool(watcher.command_answers()), 5, "the answer", site)
        answer = watcher.command_answers()[0]
        assert answer["result"] == "ignored" and not answer["ok"]
        time.sleep(1.0)
        assert not watcher.last_status["gate"]["paused"]
        logged = events(site, "command_ignored")
        assert logged and logged[0]["command"] == "pause" and logged[0]["level"] == "warning"
        assert time.monotonic() - sent < 10
    finally:
        watcher.close()
    site.stop()
    # A clean stop leaves a retained "stopped" status for dashboards that connect later.
    late = Watcher(broker.port, site.site_id)
    try:
        late.wait_status(lambda s: s.get("state") == "stopped", 0, 5)
    finally:
        late.close()


def test_config_example_renders() -> None:
    """The tiny TOML writer used above can express the [mqtt] section."""
    text = render_toml({"mqtt": {"port": 1, "subscribe": [{"topic": "a/#", "qos": 1}],
                                 "status": {"publish": True}}})
    assert 'subscribe = [{ topic = "a/#", qos = 1 }]' in text
