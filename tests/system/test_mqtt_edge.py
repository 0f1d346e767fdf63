"""MQTT at its edges (issue 13, acceptance 5): idle CPU, clean stops, oversize messages,
broker restarts, signed commands.

Each test runs the real daemon against its own Mosquitto (tests/kits/mqtt.py).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.telemetry.command_auth import (
    generate_operator_keys,
    load_operator_private,
    sign_command,
)
from tests.kits.mqtt import Broker, Publisher, check_sequences, free_port, read_restored_messages
from tests.kits.site import Site, wait_for
from tests.kits.telemetry import Watcher, scrape, value

TOPICS = [f"seq/t{i:02d}" for i in range(10)]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def durable(site: Site) -> int:
    return sum(int(e.get("messages", 0)) for e in site.log_events()
               if e.get("event") == "mqtt_batch_accepted")


def batches_accepted(site: Site) -> int:
    return sum(1 for e in site.log_events() if e.get("event") == "mqtt_batch_accepted")


def uploaded_manifests(site: Site) -> int:
    return sum(1 for p in (site.cloud / site.site_id / "manifests").rglob("*") if p.is_file())


def connections(site: Site) -> int:
    return sum(1 for e in site.log_events() if e.get("event") == "mqtt_connected")


def mqtt_site(make_site: Callable[..., Site], broker: Broker, **mqtt_extra: Any) -> Site:
    extra = mqtt_extra.pop("site_extra", {})
    conf = {"port": broker.port, "keepalive": "5s", "reconnect_initial": "0.2s",
            "reconnect_max": "1s",
            "subscribe": [{"topic": "seq/#", "qos": 1, "priority": "normal"}],
            "status": {"publish": False, "commands": False}, **mqtt_extra}
    return make_site(extra={"mqtt": conf, "telemetry": {"metrics_listen": "off"}, **extra})


def subscriptions(site: Site) -> int:
    return sum(1 for e in site.log_events() if e.get("event") == "mqtt_subscribed")


def start_and_connect(site: Site) -> None:
    """Start, and wait for the SUBACK too (see test_mqtt.start_and_connect)."""
    before, subscribed = connections(site), subscriptions(site)
    site.start()
    wait_for(lambda: connections(site) > before, 30, "the MQTT connection", site)
    wait_for(lambda: subscriptions(site) > subscribed, 30, "the MQTT subscription", site)


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


# ---- no busy loop, no teardown traceback --------------------------------------------------------


def test_idle_after_10000_messages_and_sigterm_without_traceback(
        make_site: Callable[..., Site], broker: Broker, tmp_path: Path) -> None:
    # The daemon as an operator runs it: its spool scanned at the default pace (the other
    # tests scan every 0.2 s to go faster) and info logging.
    spool = tmp_path / "idle-spool"
    spool.mkdir()
    site = mqtt_site(make_site, broker, batch={"max_age": "0.2s"}, site_extra={
        "spool": [{"name": "files", "path": str(spool), "priority": "normal"}],
        "telemetry": {"metrics_listen": "off", "log_level": "info"}})
    start_and_connect(site)
    pub = Publisher(broker.port, TOPICS, 1000).start()
    try:
        assert pub.done.wait(120) and pub.error is None, pub.error
        wait_for(lambda: durable(site) >= 10_000, 60, "10,000 durable messages", site)
    finally:
        pub.close()
    assert site.proc is not None
    # Idle means nothing left to do: every batch uploaded (on a loaded machine the uploads
    # can still be running when the last batch is durable), then the last tip and log lines.
    wait_for(lambda: uploaded_manifests(site) >= batches_accepted(site), 60,
             "every batch uploaded", site)
    time.sleep(2.0)
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


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def publish_one(port: int, topic: str, payload: bytes, protocol: int = mqtt.MQTTv5) -> None:
    """One QoS 1 message, returned once the broker acknowledged it."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(30)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def restored_records(site: Site, out: Path) -> list[dict[str, Any]]:
    site.restore(out)
    return list(read_restored_messages(out))


# ---- memory bounded per message -----------------------------------------------------------------


def test_message_at_max_size_raises_peak_rss_by_at_most_its_size_plus_64mib(
        make_site: Callable[..., Site], broker: Broker, tmp_path: Path) -> None:
    size = 32 << 20
    site = mqtt_site(make_site, broker, max_message_size="32MiB")
    start_and_connect(site)
    assert site.proc is not None
    time.sleep(1.5)  # started: imports, first housekeeping, compression level chosen
    before = vm_hwm_kib(site.proc.pid)
    payload = os.urandom(size)  # not UTF-8: the worst case, stored as base64
    publish_one(broker.port, "seq/big", payload)
    wait_for(lambda: durable(site) >= 1, 60, "the message stored", site)
    raised = (vm_hwm_kib(site.proc.pid) - before) * 1024
    print(f"peak RSS raised by {raised / 2**20:.1f} MiB for a {size >> 20} MiB message")
    assert raised <= size + (64 << 20), f"peak RSS rose {raised / 2**20:.0f} MiB"
    site.wait_drained(timeout=60)
    assert site.stop() == 0
    (record,) = restored_records(site, tmp_path / "out")
    assert base64.b64decode(record["payload_base64"]) == payload


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_larger_messages_are_refused_and_the_rest_carries_on(
        make_site: Callable[..., Site], broker: Broker, tmp_path: Path, protocol: str) -> None:
    site = mqtt_site(make_site, broker, protocol=protocol, max_message_size="1MiB",
                     batch={"max_age": "0.2s"}, site_extra={"telemetry": {
                         "metrics_listen": f"127.0.0.1:{free_port()}"}})
    start_and_connect(site)
    wire = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    publish_one(broker.port, "seq/a", b"before", wire)
    publish_one(broker.port, "seq/a", b"x" * ((1 << 20) + 1), wire)  # one byte over
    publish_one(broker.port, "seq/a", b"z" * (2 << 20), wire)  # far over
    publish_one(broker.port, "seq/a", b"y" * (1 << 20), wire)  # exactly the maximum: kept
    publish_one(broker.port, "seq/a", b"after", wire)
    wait_for(lambda: durable(site) >= 3, 30, "three messages stored", site)
    # One byte over fits in the packet size the broker was told (room for the topic): the agent
    # refuses it. Far over: in MQTT 5 the broker drops it unsent; in 3.1.1 the agent refuses it.
    expected = [(1 << 20) + 1] if protocol == "5" else [(1 << 20) + 1, 2 << 20]
    refused = [e for e in site.log_events() if e.get("event") == "mqtt_message_refused"]
    assert [e["bytes"] for e in refused] == expected, refused
    port = int(site.extra["telemetry"]["metrics_listen"].rsplit(":", 1)[1])
    assert value(scrape(port), "skyferry_mqtt_refused_total", reason="too_large") == len(expected)
    assert site.stop() == 0
    start_and_connect(site)  # acknowledged (or dropped by the broker): not sent again
    time.sleep(2.0)
    site.wait_drained(timeout=30)
    assert site.stop() == 0
    refused = [e for e in site.log_events() if e.get("event") == "mqtt_message_refused"]
    assert len(refused) == len(expected), refused
    payloads = [r["payload"] for r in restored_records(site, tmp_path / "out")]
    assert payloads == ["before", "y" * (1 << 20), "after"]


# ---- a clean stop never duplicates --------------------------------------------------------------


def test_sigterm_during_a_large_messages_ingest_then_restart_stores_it_once(
        make_site: Callable[..., Site], broker: Broker, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The drain deadline is made to pass while the batch is being committed: the committed
    # batch must still be acknowledged before the connection closes.
    monkeypatch.setenv("SKYFERRY_TEST_HOOKS", "1")
    monkeypatch.setenv("SKYFERRY_TEST_MQTT_DRAIN_S", "0.01")
    metrics_port = free_port()
    site = mqtt_site(make_site, broker, max_message_size="32MiB", site_extra={
        "telemetry": {"metrics_listen": f"127.0.0.1:{metrics_port}"},
        "compression": {"level": 9}})
    start_and_connect(site)
    payload = ("".join(f"line {i:08d} of a large telemetry dump\n" for i in range(800_000))
               ).encode()[: 30 << 20]
    publish_one(broker.port, "seq/big", payload)
    wait_for(lambda: value(scrape(metrics_port), "skyferry_mqtt_messages_total",
                           **{"class": "normal"}) >= 1, 30, "the message received", site)
    assert site.stop() == 0
    first_run = [e.get("event") for e in site.log_events()]
    start_and_connect(site)
    time.sleep(3.0)  # a re-sent copy would arrive now
    site.wait_drained(timeout=60)
    assert site.stop() == 0
    records = restored_records(site, tmp_path / "out")
    assert len(records) == 1, f"the message was stored {len(records)} times"
    assert records[0]["payload"].encode() == payload
    # The test tested what it says: the stop began while the batch was being stored, and the
    # drain deadline passed before it was.
    assert "mqtt_drain_timeout" in first_run
    assert first_run.index("stopping") < first_run.index("mqtt_batch_accepted")
    assert durable(site) == 1
    assert not non_json_lines(site), non_json_lines(site)[:20]


# ---- commands: only signed, fresh, first-seen ones ----------------------------------------------


class CommandBench:
    """A daemon that trusts one operator key, a watcher of its answers, and a stranger's key."""

    def __init__(self, make_site: Callable[..., Site], broker: Broker, root: Path) -> None:
        self.key_file, public = generate_operator_keys(root / "op")
        stranger_file, _ = generate_operator_keys(root / "stranger")
        self.key = load_operator_private(self.key_file)
        self.stranger = load_operator_private(stranger_file)
        self.metrics_port = free_port()
        self.broker = broker
        self.site = mqtt_site(make_site, broker, status={
            "publish": True, "commands": True, "interval": "1s",
            "operator_keys": [str(public)]},
            site_extra={"telemetry": {"metrics_listen": f"127.0.0.1:{self.metrics_port}"}})
        self.sid = self.site.site_id
        self.watcher: Watcher | None = None

    def start(self) -> None:
        start_and_connect(self.site)
        self.watcher = Watcher(self.broker.port, self.sid)
        self.watcher.wait_status(lambda s: s.get("state") == "running", 0, 30)

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        assert self.site.stop() == 0

    def send(self, payload: bytes) -> dict[str, Any]:
        """Publish on the cmd topic; the site's answer."""
        assert self.watcher is not None
        n = len(self.watcher.command_answers())
        self.watcher.client.publish(f"skyferry/{self.sid}/cmd", payload,
                                    qos=1).wait_for_publish(5)
        wait_for(lambda: len(self.watcher.command_answers()) > n, 10, "the answer", self.site)
        return self.watcher.command_answers()[n]

    def paused(self) -> bool:
        return bool(value(scrape(self.metrics_port), "skyferry_paused"))

    def refused_logged(self) -> list[str]:
        return [e["reason"] for e in self.site.log_events() if e.get("event") == "command_refused"]


def test_unsigned_wrongly_signed_stale_and_misaddressed_commands_are_refused(
        make_site: Callable[..., Site], broker: Broker, tmp_path: Path) -> None:
    bench = CommandBench(make_site, broker, tmp_path)
    key, sid = bench.key, bench.sid
    signed = json.loads(sign_command(key, sid, {"cmd": "pause"}))
    tampered = json.dumps({**signed, "signed": signed["signed"].replace("pause", "flush")})
    refusals = [
        (b"pause", "unsigned"),
        (b'{"cmd": "pause"}', "unsigned"),
        (sign_command(bench.stranger, sid, {"cmd": "pause"}), "bad_signature"),
        (tampered.encode(), "bad_signature"),
        (sign_command(key, sid, {"cmd": "pause"}, now=time.time() - 600), "stale"),
        (sign_command(key, sid, {"cmd": "pause"}, now=time.time() + 600), "stale"),
        (sign_command(key, "another-site", {"cmd": "pause"}), "other_site"),
    ]
    bench.start()
    try:
        for payload, reason in refusals:
            answer = bench.send(payload)
            assert (answer["ok"], answer["result"], answer.get("reason")) == (
                False, "refused", reason), answer
        assert not bench.paused()
        samples = scrape(bench.metrics_port)
        for reason in ("unsigned", "bad_signature", "stale", "other_site"):
            expected = sum(r == reason for _, r in refusals)
            assert value(samples, "skyferry_commands_refused_total", reason=reason) == expected
        # The same command, signed by the trusted key for this site, now: obeyed.
        assert bench.send(sign_command(key, sid, {"cmd": "pause"}))["result"] == "applied"
        wait_for(bench.paused, 5, "the pause", bench.site)
    finally:
        bench.stop()
    assert bench.refused_logged() == [r for _, r in refusals]  # one line each
    assert not non_json_lines(bench.site), non_json_lines(bench.site)[:20]


def test_replayed_commands_are_refused_even_after_a_restart(
        make_site: Callable[..., Site], broker: Broker, tmp_path: Path) -> None:
    bench = CommandBench(make_site, broker, tmp_path)
    pause = sign_command(bench.key, bench.sid, {"cmd": "pause"})
    resume = sign_command(bench.key, bench.sid, {"cmd": "resume"})
    bench.start()
    try:
        # Sent with `skyferry command`, which waits for the site's answer.
        r = bench.site.cli("command", "--key", str(bench.key_file), "--site", bench.sid,
                           "--broker", f"127.0.0.1:{broker.port}", "pause")
        assert "pause applied" in r.stdout, r.stdout
        wait_for(bench.paused, 5, "the pause", bench.site)
        assert bench.send(resume)["result"] == "applied"
        wait_for(lambda: not bench.paused(), 5, "the resume", bench.site)
        assert bench.send(pause)["result"] == "applied"
        assert bench.send(resume)["reason"] == "replay"  # the same bytes again
        assert bench.paused()
        assert value(scrape(bench.metrics_port), "skyferry_commands_refused_total",
                     reason="replay") == 1
    finally:
        bench.stop()
    bench.start()  # seen nonces outlive a restart
    try:
        assert bench.send(resume)["reason"] == "replay"
    finally:
        bench.stop()
    assert bench.refused_logged() == ["replay", "replay"]


# ---- per-topic order across broker restarts -----------------------------------------------------


def test_per_topic_order_holds_across_20_broker_restarts(
        make_site: Callable[..., Site], tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", persistence=True)
    broker.start()
    site = mqtt_site(make_site, broker, batch={"max_age": "0.3s"})
    # 10,000 messages: 20 restarts each 150 stored messages apart take 3,000 of them.
    per_topic, restarts = 1000, 20
    total = per_topic * len(TOPICS)
    try:
        start_and_connect(site)
        pub = Publisher(broker.port, TOPICS, per_topic, rate=1200).start()
        try:
            for _ in range(restarts):
                # Some messages stored since the last restart, unless the publisher is done.
                target = durable(site) + 150
                wait_for(lambda t=target: durable(site) >= t or pub.done.is_set(), 30,
                         "messages between restarts", site)
                n = connections(site)
                broker.stop()  # clean: Mosquitto saves the session and its queue
                broker.start()
                wait_for(lambda n=n: connections(site) > n, 30, "the agent to reconnect", site)
            assert pub.done.wait(120) and pub.error is None, pub.error
            # Stored copies count re-sends too: wait for the stream to go quiet as well.
            wait_for(lambda: durable(site) >= total, 60, f"{total} durable messages", site)
            last, since = durable(site), time.monotonic()
            while time.monotonic() - since < 3.0:
                time.sleep(0.2)
                if durable(site) != last:
                    last, since = durable(site), time.monotonic()
        finally:
            pub.close()
        assert site.stop() == 0
        start_and_connect(site)
        site.wait_drained(timeout=60)
        assert site.stop() == 0
    finally:
        broker.kill()
    assert connections(site) >= restarts + 2
    assert not pub.wire_problems, pub.wire_problems[:5]  # the publisher kept its own order
    site.restore(tmp_path / "out")
    dups, problems = check_sequences(read_restored_messages(tmp_path / "out"), TOPICS, per_topic)
    print(f"{restarts} broker restarts: {total} messages, {dups} duplicates")
    assert not problems, problems[:10]


# ---- a batch's compression is bounded ------------------------------------------------------------


def test_batches_are_compressed_at_level_9_at_most(tmp_path: Path) -> None:
    """With the link closed `auto` can choose level 19 (a minute of CPU for 143 MiB, ~80 MiB of
    context): an in-memory batch is compressed at BATCH_MAX_LEVEL at most; files are not."""
    from agent.config.settings import DEFAULT_CLASSES, ChunkingSettings, CompressionSettings
    from agent.format.keys import generate_keys, load_edge_keys
    from agent.ingest.pipeline import Pipeline
    from agent.ingest.requests import BatchRequest
    from agent.ingest.sealing import BATCH_MAX_LEVEL
    from agent.store.store import Store

    gen = generate_keys(tmp_path / "keys", "s1")
    keys = load_edge_keys(gen.edge_dir / "recipient.pub", gen.edge_dir / "site.key",
                          gen.edge_dir / "dedup.key")
    store = Store(tmp_path / "state", DEFAULT_CLASSES)
    try:
        pipeline = Pipeline("s1", keys, store, ChunkingSettings(), CompressionSettings(level=19))
        pipeline.compressor.set_level(19, long_distance=True)
        body = b"".join(f"line {i} of a telemetry dump\n".encode() for i in range(200_000))
        t0 = time.process_time()
        pipeline.ingest_batch(BatchRequest(body, "mqtt", "normal", "x-", ".jsonl", 1))
        cpu = time.process_time() - t0
        levels = sorted(pipeline.compressor._local.zstd)  # the contexts this thread made
        assert max(level for level, _ in levels) == BATCH_MAX_LEVEL, levels
        assert (19, True) not in levels
        assert cpu < 5.0, f"{cpu:.1f} s of CPU for a {len(body) >> 20} MiB batch"
    finally:
        store.close()
