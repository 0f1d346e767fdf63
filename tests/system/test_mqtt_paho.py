"""agent/broker/paho_adapter.py: each reach into aiomqtt 2.5 / paho-mqtt 2.x, against a real
Mosquitto. A failure here after an upgrade says which assumption broke."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.broker import paho_adapter as mqtt_paho
from agent.broker.paho_adapter import PahoAccess, decode_publish, fix_write_watch
from tests.kits.mqtt import Broker

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311


# ---- decode_publish: paho's result, one payload copy ---------------------------------------------


def _publish_body(topic: bytes, mid: int | None, props: bytes | None, payload: bytes) -> bytes:
    out = len(topic).to_bytes(2, "big") + topic
    if mid is not None:
        out += mid.to_bytes(2, "big")
    if props is not None:
        out += props
    return out + payload


def _v5_props() -> bytes:
    p = Properties(PacketTypes.PUBLISH)
    p.ContentType = "text/plain"
    p.MessageExpiryInterval = 60
    p.UserProperty = [("k", "v"), ("k2", "é")]
    return bytes(p.pack())


@pytest.mark.parametrize(("header", "protocol", "topic", "mid", "props", "payload"), [
    (0x30, V311, b"a/b", None, None, b"hello"),
    (0x32, V311, "sensör/1".encode(), 7, None, os.urandom(1000)),
    (0x3B, V311, b"t", 65535, None, b""),  # dup, qos 1, retain
    (0x30, V5, b"a", None, b"\x00", b"x" * 300),
    (0x32, V5, b"a/b/c", 1, _v5_props(), os.urandom(70_000)),
    (0x32, V5, b"", 2, _v5_props(), b"empty topic is allowed in 5 (an alias)"),
])
def test_decode_publish_gives_what_paho_gives(header: int, protocol: MQTTProtocolVersion,
                                              topic: bytes, mid: int | None,
                                              props: bytes | None, payload: bytes) -> None:
    packet = bytearray(_publish_body(topic, mid, props, payload))
    ours = decode_publish(header, packet, protocol)
    theirs = mqtt_paho._ORIGINAL_DECODE_PUBLISH(header, packet, protocol)
    assert ours._replace(properties=None) == theirs._replace(properties=None)
    assert type(ours.payload) is bytes and ours.payload == payload
    if props is not None:
        assert ours.properties is not None and theirs.properties is not None
        assert ours.properties.json() == theirs.properties.json()


@pytest.mark.parametrize(("protocol", "packet"), [
    (V311, b"\x00"),  # no room for the topic length
    (V311, b"\x00\x09abc"),  # topic runs past the end
    (V311, b"\x00\x00payload"),  # empty topic in 3.1.1
    (V5, b"\x00\x01a\x00\x01\x05\x01"),  # properties run past the end
    (V5, b"\x00\x01a\x00\x01\xff\xff\xff\xff\xff"),  # 5-byte variable integer
])
def test_decode_publish_refuses_malformed_packets(protocol: MQTTProtocolVersion,
                                                  packet: bytes) -> None:
    header = 0x32 if protocol == V5 else 0x30
    with pytest.raises(MalformedPacket):
        decode_publish(header, bytearray(packet), protocol)


def test_decode_publish_is_installed_in_paho() -> None:
    assert _packet.decode_publish is decode_publish


# ---- write readiness: no writer left on the socket, no callback on a closed one ---------------


def _writers(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Descriptors the loop watches for writing (asyncio's selector, read for the test)."""
    selector = loop._selector  # type: ignore[attr-defined]
    return [key.fd for key in selector.get_map().values() if key.data[1] is not None]


async def _receive_ack_idle(port: int, *, fixed: bool) -> tuple[list[int], float, list[str]]:
    """Take one QoS 1 message with manual acknowledgement, ack and flush it, then idle 1 s.
    Returns (descriptors still watched for writing, CPU share while idle, loop errors)."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    loop.set_exception_handler(lambda _l, ctx: errors.append(str(ctx.get("message"))
                                                               + str(ctx.get("exception"))))
    client = aiomqtt.Client("127.0.0.1", port, identifier="watch-test",
                            protocol=aiomqtt.ProtocolVersion.V5)
    if fixed:
        access = PahoAccess(client)
    else:  # aiomqtt's own write registration, manual acknowledgement as skyferry needs it
        access = PahoAccess.__new__(PahoAccess)
        access.client = mqtt_paho.paho_client(client)
        access.client.manual_ack_set(True)
    async with client:
        await client.subscribe("w/#", qos=1)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        pub.publish("w/x", b"1", qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        async for msg in client.messages:
            access.ack(msg.mid, msg.qos)
            access.flush()
            break
        await asyncio.sleep(0.2)
        watched = _writers(loop)
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(1.0)
        share = (time.process_time() - cpu0) / (time.monotonic() - t0)
    await asyncio.sleep(0.1)  # callbacks scheduled by the close run now
    return watched, share, errors


def test_flushed_acknowledgement_leaves_no_writer_and_close_is_clean(broker: Broker) -> None:
    watched, share, errors = asyncio.run(_receive_ack_idle(broker.port, fixed=True))
    assert watched == [], "a writer stayed registered after everything was written"
    assert share < 0.2, f"idle client used {share:.0%} of a core"
    assert errors == [], errors


@pytest.mark.timing
def test_aiomqtt_alone_still_leaves_the_writer(broker: Broker) -> None:
    """Why _WriteWatch exists: with aiomqtt's own callbacks the flushed acknowledgement leaves a
    writer on the socket (a busy loop). If this fails after an upgrade, aiomqtt fixed it and
    the watch may go."""
    watched, share, _ = asyncio.run(_receive_ack_idle(broker.port, fixed=False))
    assert watched and share > 0.5, (watched, share)


def test_write_watch_on_a_plain_client_publishes_and_closes_cleanly(broker: Broker) -> None:
    async def scenario() -> list[str]:
        errors: list[str] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _l, ctx: errors.append(str(ctx.get("message"))))
        got: list[Any] = []
        async with aiomqtt.Client("127.0.0.1", broker.port) as sub:
            await sub.subscribe("p/#", qos=1)
            client = aiomqtt.Client("127.0.0.1", broker.port)
            fix_write_watch(client)
            async with client:
                for i in range(50):
                    await client.publish("p/x", str(i), qos=1)
            async for msg in sub.messages:
                got.append(msg.payload)
                if len(got) == 50:
                    break
        await asyncio.sleep(0.1)
        assert got == [str(i).encode() for i in range(50)]
        return errors

    assert asyncio.run(scenario()) == []


def test_malloc_thresholds_are_fixed_on_glibc() -> None:
    """agent/host/memory.py: what keeps a message's peak memory repeatable (the RSS test in
    tests/system/test_mqtt_edge.py measures the effect)."""
    from agent.host.memory import fix_malloc_thresholds

    assert fix_malloc_thresholds() is True
