"""MQTT in (issue 5): acknowledged only once durable, across kill -9, broker restarts, SIGTERM.

Every test runs its own Mosquitto (tests/kits/mqtt.py) on a free port, so killing or restarting
it never touches the broker the machine runs on 1883.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.broker.paho_adapter import PahoAccess
from agent.broker.reconnect import keep_connected
from agent.daemon.site_config import validate
from agent.errors import ConfigError
from agent.sources.mqtt import MqttSource
from agent.sources.mqtt_records import batch_name_prefix, encode_jsonl
from tests.kits.mqtt import (
    MOSQUITTO,
    Broker,
    Publisher,
    check_sequences,
    free_port,
    read_restored_messages,
    wait_port,
)
from tests.kits.site import PYTHON, Site, wait_for

TOPICS = [f"seq/t{i:02d}" for i in range(20)]
PER_TOPIC = int(os.environ.get("SKYFERRY_MQTT_PER_TOPIC", "2500"))  # 20 x 2500 = 50,000


def durable(site: Site) -> int:
    """Messages made durable so far (duplicates included), from the agent's log."""
    return sum(int(e.get("messages", 0)) for e in site.log_events()
               if e.get("event") == "mqtt_batch_accepted")


def connections(site: Site) -> list[dict[str, Any]]:
    return [e for e in site.log_events() if e.get("event") == "mqtt_connected"]


def mqtt_site(make_site: Callable[..., Site], broker: Broker, **mqtt_extra: Any) -> Site:
    conf = {"port": broker.port, "keepalive": "5s", "reconnect_initial": "0.2s",
            "reconnect_max": "2s",
            "subscribe": [{"topic": "seq/#", "qos": 1, "priority": "normal"}],
            "status": {"publish": False, "commands": False}, **mqtt_extra}
    return make_site(extra={"mqtt": conf, "telemetry": {"metrics_listen": "off"}})


def subscriptions(site: Site) -> int:
    return sum(1 for e in site.log_events() if e.get("event") == "mqtt_subscribed")


def start_and_connect(site: Site, n_before: int = 0) -> None:
    """Start, and wait until the broker routes the topics to the agent (its SUBACK): a message
    published between the CONNACK and the SUBACK of a first session is nobody's."""
    subscribed = subscriptions(site)
    site.start()
    wait_for(lambda: len(connections(site)) > n_before, 30, "the MQTT connection", site)
    wait_for(lambda: subscriptions(site) > subscribed, 30, "the MQTT subscription", site)


def settle(site: Site, total: int, timeout: float) -> None:
    """Until at least `total` messages are durable and nothing new arrived for 2 s."""
    wait_for(lambda: durable(site) >= total, timeout, f"{total} durable messages", site)
    last, since = durable(site), time.monotonic()
    while time.monotonic() - since < 2.0:
        time.sleep(0.2)
        now = durable(site)
        if now != last:
            last, since = now, time.monotonic()


# ---- the acknowledgement contract (aiomqtt pinned, paho underneath) -----------------------------


async def _session(port: int, received: list[aiomqtt.Message], ack: set[int],
                   count: int) -> bool:
    """Connect with a persistent session, take `count` messages, acknowledge those in `ack`."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client = aiomqtt.Client("127.0.0.1", port, identifier="ack-contract",
                            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                            properties=props)
    paho_access = PahoAccess(client)
    async with client:
        await client.subscribe("c/#", qos=1)
        async for msg in client.messages:
            received.append(msg)
            if int(msg.payload) in ack:  # type: ignore[arg-type]
                paho_access.ack(msg.mid, msg.qos)
            if len(received) == count:
                break
        await asyncio.sleep(0.2)  # let the PUBACKs leave before the DISCONNECT
    return paho_access.session_present


def test_unacknowledged_messages_come_back(broker: Broker) -> None:
    """What MQTT-in relies on: through aiomqtt's paho client, a message we do not acknowledge
    is re-sent after a reconnect, and one we did acknowledge is not."""
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="contract-pub")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()

    async def scenario() -> tuple[list[int], list[int], bool, bool]:
        first: list[aiomqtt.Message] = []
        # Create the session (and subscription) before anything is published.
        task = asyncio.create_task(_session(broker.port, first, {0, 1}, 5))
        await asyncio.sleep(0.5)
        for i in range(5):
            pub.publish("c/x", str(i), qos=1).wait_for_publish(5)
        present1 = await asyncio.wait_for(task, 10)
        second: list[aiomqtt.Message] = []
        present2 = await asyncio.wait_for(_session(broker.port, second, {2, 3, 4}, 3), 10)
        return ([int(m.payload) for m in first],  # type: ignore[arg-type]
                [int(m.payload) for m in second], present1, present2)  # type: ignore[arg-type]

    first, second, present1, present2 = asyncio.run(scenario())
    pub.loop_stop()
    assert first == [0, 1, 2, 3, 4]
    assert second == [2, 3, 4], "unacknowledged messages were not re-sent (or acked ones were)"
    assert not present1 and present2, "the broker did not keep the session"


def test_keep_connected_backs_off_reports_each_loss_and_stops() -> None:
    """The reconnect loop both MQTT connections run: waits between half and all of
    initial * 2^n (capped), reports every failure, runs no session once stopped."""

    async def scenario() -> tuple[list[float], list[str]]:
        stop = asyncio.Event()
        lost: list[str] = []
        starts: list[float] = []
        loop = asyncio.get_running_loop()

        async def session() -> None:
            starts.append(loop.time())
            if len(starts) == 6:
                stop.set()
            raise ConnectionRefusedError(f"attempt {len(starts)}")

        await asyncio.wait_for(
            keep_connected(session, stop, 0.05, 0.2, lambda e: lost.append(str(e))), 10)
        return starts, lost

    starts, lost = asyncio.run(scenario())
    assert lost == [f"attempt {i}" for i in range(1, 7)]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    for gap, delay in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
        assert delay / 2 - 0.01 <= gap <= delay + 0.15, (gaps, delay)


def test_keep_connected_starts_the_backoff_again_after_a_working_connection() -> None:
    """Five refusals in a row push the wait towards max; a session that then stays up for
    stable_s was a working connection, so the wait after it drops is back near initial."""

    async def scenario() -> list[float]:
        stop = asyncio.Event()
        starts: list[float] = []
        loop = asyncio.get_running_loop()

        async def session() -> None:
            starts.append(loop.time())
            if len(starts) == 6:
                await asyncio.sleep(0.6)  # connected, serving, then the broker goes away
            if len(starts) == 8:
                stop.set()
            raise ConnectionResetError(f"attempt {len(starts)}")

        await asyncio.wait_for(
            keep_connected(session, stop, 0.05, 1.0, lambda e: None, stable_s=0.5), 20)
        return starts

    starts = asyncio.run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 7, gaps
    assert gaps[4] >= 0.4, gaps  # the fifth refusal in a row waited at least half of 0.8 s
    after_drop = gaps[5] - 0.6  # the session itself lasted 0.6 s
    assert 0.02 <= after_drop <= 0.05 + 0.1, gaps  # initial again, not >= 0.5 (half of max)
    assert gaps[6] <= 0.1 + 0.1, gaps  # and growing from there: 0.1 next


def test_keep_connected_stop_cuts_the_wait_and_cancel_propagates() -> None:
    async def scenario() -> tuple[float, int, list[str]]:
        stop = asyncio.Event()
        lost: list[str] = []
        calls = 0

        async def failing() -> None:
            nonlocal calls
            calls += 1
            raise OSError("refused")

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        loop.call_later(0.1, stop.set)  # during the first wait (30 to 60 s)
        await asyncio.wait_for(keep_connected(failing, stop, 60, 60, lambda e: None), 10)
        waited = loop.time() - t0

        async def serving() -> None:
            await asyncio.Event().wait()  # connected until cancelled

        task = asyncio.create_task(keep_connected(serving, asyncio.Event(), 0.01, 0.01,
                                                  lambda e: lost.append(str(e))))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return waited, calls, lost

    waited, calls, lost = asyncio.run(scenario())
    assert calls == 1 and waited < 5, (calls, waited)
    assert lost == [], "a cancel (shutdown) is not a lost connection"


def test_receive_times_and_batch_names_keep_order_when_the_clock_steps_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    wall = iter([1_800_000_000_000_000_000, 1_800_000_000_500_000_000,
                 1_799_999_990_000_000_000,  # stepped back 10.5 s
                 1_799_999_995_000_000_000, 1_800_000_001_000_000_000])
    monkeypatch.setattr("agent.sources.mqtt.time.time_ns", lambda: next(wall))
    source = MqttSource.__new__(MqttSource)  # the clock only: no broker, no settings
    source._last_received_ns = 0
    times = [source._receive_time_ns() for _ in range(5)]
    assert times == [1_800_000_000_000_000_000, 1_800_000_000_500_000_000,
                     1_800_000_000_500_001_000, 1_800_000_000_500_002_000,
                     1_800_000_001_000_000_000]
    names = [batch_name_prefix(t) for t in times]
    assert names == sorted(set(names)), names  # strictly increasing, microsecond names


def test_records_are_json_lines_with_text_or_base64() -> None:
    from agent.sources.mqtt import Received

    recs = [Received("a/b", "héllo\n".encode(), 1, False, 1_764_000_000_123_456_000, 1, 1),
            Received("a/c", b"\xff\x00", 0, True, 1_764_000_001_000_000_000, 2, 1)]
    lines = [json.loads(x) for x in encode_jsonl(recs).decode().splitlines()]
    assert lines[0] == {"topic": "a/b", "qos": 1, "retain": False, "payload": "héllo\n",
                        "received": "2025-11-24T16:00:00.123456Z"}
    assert lines[1]["payload_base64"] == "/wA=" and "payload" not in lines[1]
    assert lines[1]["retain"] is True and lines[1]["qos"] == 0


@pytest.mark.parametrize(("mqtt_conf", "key", "words"), [
    ({"subscribe": [{"topic": "a/#", "qos": 2}]}, "mqtt.subscribe[0].qos", "QoS 2"),
    ({"subscribe": [{"topic": "a/#/b"}]}, "mqtt.subscribe[0].topic", '"#" must be'),
    ({"subscribe": [{"topic": "a", "priority": "urgent"}]}, "mqtt.subscribe[0].priority",
     "critical"),
    ({"password_file": "/x"}, "mqtt.username", "add username"),
    ({"password_env": "my password"}, "mqtt.password_env", "name of the variable"),
    ({"batch": {"max_messages": 5000}}, "mqtt.batch.max_messages", "max_inflight"),
    ({"batch": {"high": {"max_age": "0s"}}}, "mqtt.batch.high.max_age", "greater than zero"),
    ({"protocol": "4"}, "mqtt.protocol", '"3.1.1"'),
    ({"source": "files"}, "mqtt.source", "another source"),
    ({"hots": "x"}, "mqtt.hots", "did you mean 'host'"),
    ({"max_message_size": "64MiB"}, "mqtt.max_message_size", "between 1 byte and 32MiB"),
    ({"max_message_size": 0}, "mqtt.max_message_size", "between 1 byte"),
    ({"status": {"operator_keys": ["nowhere.pub"]}}, "mqtt.status.operator_keys[0]",
     "does not exist"),
    ({"status": {"operator_keys": "ops.pub"}}, "mqtt.status.operator_keys", "list of file"),
    ({"status": {"command_max_age": "0s"}}, "mqtt.status.command_max_age", "between 1s"),
])
def test_mqtt_config_problems_name_the_key(tmp_path: Path, mqtt_conf: dict[str, Any], key: str,
                                          words: str) -> None:
    data = {"site": {"id": "s1", "state_dir": "state"},
            "keys": {"recipient_public": "r", "signing_key": "s", "dedup_key": "d"},
            "backend": {"url": "file:///tmp/x"},
            "spool": [{"name": "files", "path": "spool"}], "mqtt": mqtt_conf}
    with pytest.raises(ConfigError) as exc:
        validate(data, tmp_path / "x.toml")
    hits = [p for p in exc.value.problems if p.startswith(key)]
    assert hits and words in hits[0], exc.value.problems


# ---- acceptance 3: 50,000 messages, kill -9 twice ---------------------------------------------


def test_kill9_twice_every_sequence_in_order(make_site: Callable[..., Site], broker: Broker,
                                              tmp_path: Path) -> None:
    # A crash can duplicate at most the batch whose acknowledgements the broker had not yet
    # processed: Mosquitto reads one packet per client per loop turn and drops what it had not
    # read when the connection resets. 2 kills x 200 messages stays under 1% of 50,000
    # whatever the instant of the kill, which is why 200 is the default.
    site = mqtt_site(make_site, broker)  # default batching: at most 200 messages a batch
    start_and_connect(site)
    total = PER_TOPIC * len(TOPICS)
    started = time.monotonic()
    pub = Publisher(broker.port, TOPICS, PER_TOPIC).start()
    try:
        for kill_at in (total // 5, total * 3 // 5):
            wait_for(lambda k=kill_at: durable(site) >= k, 60, f"{kill_at} durable", site)
            site.kill9()
            time.sleep(0.3)  # the publisher keeps going: the broker queues for the session
            start_and_connect(site, len(connections(site)))
        assert pub.done.wait(120) and pub.error is None, pub.error
        # The count comes from the log, and a kill can land after a batch was made durable and
        # (partly) acknowledged but before its log line: up to one batch a kill is then never
        # counted (seen: 49,997 of 50,000 counted, all 50,000 restored). Restore below is the
        # real check; here, wait for the stream to go quiet.
        settle(site, total - 2 * 200, 90)
        elapsed = time.monotonic() - started
    finally:
        pub.close()
    # SIGTERM makes the last open batch durable and acknowledges it; a restart uploads it.
    assert site.stop() == 0
    start_and_connect(site, len(connections(site)))
    site.wait_drained(timeout=60)
    assert site.stop() == 0
    report = json.loads(site.restore(tmp_path / "out").stdout)
    assert report["ok"], report
    dups, problems = check_sequences(read_restored_messages(tmp_path / "out"), TOPICS,
                                     PER_TOPIC)
    print(f"mqtt kill-9 x2: {total} messages, {dups} duplicates ({dups / total:.3%}), "
          f"{report['objects_ok']} objects, {elapsed:.1f}s")
    assert not pub.wire_problems, pub.wire_problems[:5]
    assert not problems, problems[:10]
    assert dups < total / 100, f"{dups} duplicates is not under 1% of {total}"
    assert len([e for e in site.log_events() if e.get("event") == "started"]) == 4


# ---- acceptance 4: the broker restarts mid-stream ---------------------------------------------


def test_broker_restart_agent_reconnects_and_loses_nothing(
        make_site: Callable[..., Site], tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", persistence=True)
    broker.start()
    site = mqtt_site(make_site, broker)
    try:
        start_and_connect(site)
        per_topic = 300
        pub = Publisher(broker.port, TOPICS[:10], per_topic, rate=1500).start()
        try:
            wait_for(lambda: durable(site) >= 1000, 30, "1000 durable messages", site)
            broker.stop()  # clean stop: Mosquitto saves sessions and queued messages
            time.sleep(1.0)
            broker.start()  # same port: publisher and agent must find it by themselves
            wait_for(lambda: len(connections(site)) >= 2, 30, "the agent to reconnect", site)
            assert pub.done.wait(60) and pub.error is None, pub.error
            settle(site, per_topic * 10, 60)
        finally:
            pub.close()
        assert site.stop() == 0  # makes the open batch durable
        start_and_connect(site, len(connections(site)))
        site.wait_drained(timeout=60)
        assert site.stop() == 0
    finally:
        broker.kill()
    events = site.log_events()
    assert any(e.get("event") == "mqtt_disconnected" for e in events)
    assert connections(site)[1]["session_present"] is True
    # The publisher itself kept each topic's order on the wire across its own reconnect: an
    # order problem below is then the agent's (see Publisher on what paho does otherwise).
    assert not pub.wire_problems, pub.wire_problems[:5]
    site.restore(tmp_path / "out")
    dups, problems = check_sequences(read_restored_messages(tmp_path / "out"), TOPICS[:10],
                                     per_topic)
    # Duplicates are allowed here: acknowledgements in flight when the broker stopped, and the
    # publisher's own QoS 1 re-sends after it reconnects, come back (the first copy is in its
    # place). Nothing may be missing, and each topic is in the order it was published.
    print(f"broker restart: {per_topic * 10} messages, {dups} duplicates")
    assert not problems, problems[:10]


# ---- SIGTERM: what was received is made durable and acknowledged before exit -----------------


def test_sigterm_makes_open_batches_durable_and_acknowledges_them(
        make_site: Callable[..., Site], broker: Broker, tmp_path: Path) -> None:
    # A long max_age: without the drain, these messages would sit in an open batch at exit.
    site = mqtt_site(make_site, broker, batch={"max_age": "10m", "max_messages": 1000})
    start_and_connect(site)
    pub = Publisher(broker.port, TOPICS[:4], 50).start()
    assert pub.done.wait(30) and pub.error is None
    pub.close()
    time.sleep(0.5)
    assert durable(site) == 0  # still in the open batch
    t0 = time.monotonic()
    assert site.stop() == 0
    stop_s = time.monotonic() - t0
    assert durable(site) == 200
    assert stop_s < 10, f"stopping took {stop_s:.1f}s"
    # Acknowledged before the disconnect: a restart gets nothing again from the broker.
    start_and_connect(site, len(connections(site)))
    time.sleep(2.0)
    assert durable(site) == 200, "the broker re-sent messages that were already durable"
    site.wait_drained(timeout=30)
    site.stop()
    site.restore(tmp_path / "out")
    dups, problems = check_sequences(read_restored_messages(tmp_path / "out"), TOPICS[:4], 50)
    assert (dups, problems) == (0, [])
    names = sorted(p.name for p in (tmp_path / "out" / site.site_id / "mqtt" / "mqtt").iterdir())
    assert len(names) == 1 and names[0].endswith(".jsonl")


# ---- TLS and username/password ------------------------------------------------------------------


def _tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, made here."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "skyferry test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    paths = (d / "ca.pem", d / "server.pem", d / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_tls_and_password_from_file(make_site: Callable[..., Site], tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path / "tls")
    passwd = tmp_path / "broker-passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "edge", "s3cret pass"],
                   check=True, capture_output=True)
    tls_port = free_port()
    # The plain listener stays anonymous for the test publisher; the agent uses TLS + password.
    broker = Broker(tmp_path / "broker", head="per_listener_settings true\n",
                    extra=(f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\n"
                           f"keyfile {key}\npassword_file {passwd}\nallow_anonymous false\n"))
    broker.start()
    try:
        wait_port(tls_port)
        secret = tmp_path / "mqtt.password"
        secret.write_text("s3cret pass\n")
        secret.chmod(0o600)
        site = make_site(extra={"mqtt": {
            "port": tls_port, "username": "edge", "password_file": str(secret),
            "tls": {"ca_file": str(ca)}, "subscribe": [{"topic": "seq/#", "qos": 1}],
            "batch": {"max_age": "0.2s"}, "status": {"publish": False, "commands": False}},
            "telemetry": {"metrics_listen": "off"}})
        start_and_connect(site)
        pub = Publisher(broker.port, TOPICS[:2], 20).start()
        assert pub.done.wait(30) and pub.error is None
        pub.close()
        wait_for(lambda: durable(site) >= 40, 20, "40 durable messages", site)
        site.wait_drained(timeout=30)
        site.stop()
    finally:
        broker.kill()
    site.restore(tmp_path / "out")
    dups, problems = check_sequences(read_restored_messages(tmp_path / "out"), TOPICS[:2], 20)
    assert (dups, problems) == (0, [])


def test_wrong_password_is_reported_and_retried(make_site: Callable[..., Site],
                                                tmp_path: Path) -> None:
    passwd = tmp_path / "broker-passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "edge", "right"],
                   check=True, capture_output=True)
    broker = Broker(tmp_path / "broker", extra=f"password_file {passwd}\n")
    broker.write_conf()
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true",
                                                           "allow_anonymous false"))
    broker.proc = subprocess.Popen([MOSQUITTO, "-c", str(broker.conf)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(broker.port)
        site = mqtt_site(make_site, broker, username="edge", password_env="SKYFERRY_TEST_PW")
        env = {**os.environ, "SKYFERRY_TEST_PW": "wrong"}
        log = open(site.log_path, "ab")  # noqa: SIM115 - the daemon owns it
        site.proc = subprocess.Popen([PYTHON, "-m", "agent", "run", "-c", str(site.config)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_for(lambda: sum(e.get("event") == "mqtt_disconnected"
                             for e in site.log_events()) >= 2, 20, "two failed attempts", site)
        assert site.proc.poll() is None, "a refused login must not stop the agent"
        site.stop()
    finally:
        broker.kill()


def test_example_mqtt_section_is_documented_and_loads(tmp_path: Path) -> None:
    """The commented-out [mqtt] example of config/skyferry.toml is valid once uncommented."""
    import re

    from agent.daemon.site_config import load_settings

    example = Path(__file__).resolve().parents[2] / "config" / "skyferry.toml"
    text = example.read_text()
    head, mqtt_part = text.split("\n# [mqtt]\n", 1)
    lines = ["[mqtt]"]
    for line in mqtt_part.splitlines():
        if line.startswith("# password_env"):
            continue  # the alternative to password_file: one of the two
        if line.startswith("# operator_keys"):
            continue  # names a file this test does not have
        if re.match(r"# (\[|[a-z_]+ = )|#   [{\]]", line):
            lines.append(line[2:])
    conf = tmp_path / "skyferry.toml"
    conf.write_text(head + "\n" + "\n".join(lines) + "\n")
    m = load_settings(conf).mqtt
    assert m is not None and m.tls is not None and m.password is not None
    assert [s.priority for s in m.subscriptions] == ["critical", "normal"]
    assert m.batching_for("critical").max_age_s == 1.0 and m.batching.max_age_s == 5.0
    assert m.max_message_bytes == 16 << 20 and m.status.command_max_age_s == 300.0
    for key in ("host", "port", "protocol", "client_id", "source", "username", "password_file",
                "password_env", "keepalive", "session_expiry", "max_inflight",
                "reconnect_initial", "reconnect_max", "max_bytes", "max_messages", "max_age",
                "ca_file", "cert_file", "key_file", "insecure", "publish", "interval",
                "commands", "topic_prefix", "max_message_size", "operator_keys",
                "command_max_age"):
        assert re.search(rf"^# {key} = ", mqtt_part, re.MULTILINE), key


def test_sighup_changes_subscriptions_without_losing_messages(
        make_site: Callable[..., Site], broker: Broker, tmp_path: Path) -> None:
    import signal

    site = mqtt_site(make_site, broker, batch={"max_age": "0.3s"})
    start_and_connect(site)
    pub = Publisher(broker.port, TOPICS[:4], 300, rate=400).start()
    time.sleep(1.0)
    site.extra["mqtt"]["subscribe"].append({"topic": "more/#", "qos": 1, "priority": "high"})
    site.write_config()
    os.kill(site.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: bool(site.log_events() and [e for e in site.log_events()
                                                  if e.get("event") == "reloaded"]),
             20, "the reload", site)
    assert pub.done.wait(60) and pub.error is None
    pub.close()
    more = Publisher(broker.port, ["more/x"], 30, client_id="more-pub").start()
    assert more.done.wait(30) and more.error is None
    more.close()
    settle(site, 1230, 30)
    assert site.stop() == 0
    start_and_connect(site, len(connections(site)))
    site.wait_drained(timeout=60)
    site.stop()
    assert [e["changed"] for e in site.log_events() if e.get("event") == "reloaded"] == [["mqtt"]]
    site.restore(tmp_path / "out")
    records = list(read_restored_messages(tmp_path / "out"))
    dups, problems = check_sequences(iter([r for r in records if r["topic"] != "more/x"]),
                                     TOPICS[:4], 300)
    assert not problems and dups == 0, (dups, problems[:5])
    assert sorted(json.loads(r["payload"])["seq"] for r in records
                  if r["topic"] == "more/x") == list(range(30))
