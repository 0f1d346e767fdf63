"""The one place skyferry reaches inside aiomqtt and the paho-mqtt client it wraps.

Why it must (aiomqtt is pinned to 2.5.x and paho-mqtt to 2.x in pyproject.toml;
tests/system/test_mqtt_paho.py checks every assumption below against a real Mosquitto):

1. Acknowledge only once durable. aiomqtt 2.5 lets paho send a QoS 1 PUBACK as soon as the
   PUBLISH is read (its open issue on manual acknowledgements); paho 2.x can wait:
   `manual_ack_set(True)`, then `ack(mid, qos)`. aiomqtt does not expose its paho client, so it
   is taken from `aiomqtt.Client._client`.
2. The CONNACK's session-present flag, which aiomqtt drops: paho's `on_connect` is wrapped.
3. Write readiness. aiomqtt registers paho's socket for writing with a *deferred*
   `call_soon_threadsafe(loop.add_writer, ...)` but removes it at once. When packets are written
   in between (an acknowledgement flushed right away, see `flush`), paho believes the socket is
   unregistered while the event loop keeps a writer on a socket that is always writable: the
   daemon spun at ~12,000 wake-ups a second after one QoS 1 message, and at a stop the deferred
   `add_writer` met a closed descriptor (an `add_writer ... Bad file descriptor` traceback).
   `_WriteWatch` replaces both callbacks: each one makes the loop's writer match what paho wants
   *when it runs* (a socket, with bytes to write), so a late one is harmless.
4. Memory per message. paho's `_packet.decode_publish` splits a PUBLISH with `struct.unpack`
   and an `{n}s` field for "the rest", which copies the remainder at every field: a 32 MiB
   message briefly took over three times its size. `decode_publish` below gives the same
   result from a memoryview with one copy of the payload, and is installed in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import SkyferryError

log = logging.getLogger("skyferry.mqtt")


def paho_client(client: aiomqtt.Client) -> paho.Client:
    """The paho client an aiomqtt client drives."""
    inner = getattr(client, "_client", None)
    if not isinstance(inner, paho.Client):
        raise SkyferryError(
            "this aiomqtt does not wrap a paho-mqtt client where skyferry expects it; "
            "install the aiomqtt version pinned in pyproject.toml")
    return inner


class _WriteWatch:
    """Keeps the event loop's writer on paho's socket exactly while paho has bytes to write."""

    def __init__(self, client: aiomqtt.Client, inner: paho.Client) -> None:
        self._outer = client
        self._inner = inner
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._fd: int | None = None  # the descriptor our writer is registered on
        inner.on_socket_register_write = self._changed
        inner.on_socket_unregister_write = self._changed

    def _changed(self, _client: paho.Client, _userdata: Any, _sock: Any) -> None:
        # paho calls this on the loop, except while connecting (aiomqtt connects in a thread).
        if threading.get_ident() == self._loop_thread:
            self.sync()
        else:
            self._loop.call_soon_threadsafe(self.sync)

    def sync(self) -> None:
        sock = self._inner.socket()
        fd = sock.fileno() if sock is not None else -1
        if fd < 0 or not self._inner.want_write():
            self._drop()
        elif fd != self._fd:
            self._drop()
            self._loop.add_writer(fd, self._writable)
            self._fd = fd

    def _drop(self) -> None:
        # paho unregisters before it closes the socket, so the descriptor is still valid here.
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(fd)

    def _writable(self) -> None:
        try:
            self._inner.loop_write()
        except Exception as e:  # a broken connection: end it the way aiomqtt would
            disconnected = getattr(self._outer, "_disconnected", None)
            if isinstance(disconnected, asyncio.Future) and not disconnected.done():
                disconnected.set_exception(e)
            else:
                log.debug("MQTT write failed: %s", e)
        self.sync()


def fix_write_watch(client: aiomqtt.Client) -> None:
    """Replace aiomqtt's write registration (see point 3 above). Call before connecting."""
    _WriteWatch(client, paho_client(client))


class PahoAccess:
    """Manual acknowledgement and the session-present flag of an aiomqtt client's paho client.

    Made before the client connects, inside the event loop that runs it.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        inner = paho_client(client)
        self.client = inner
        self.session_present = False
        self.writes = _WriteWatch(client, inner)
        inner.manual_ack_set(True)
        wrapped: Any = inner.on_connect  # aiomqtt's handler (paho types it loosely)

        def on_connect(c: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                       reason: Any, properties: Any = None) -> None:
            self.session_present = bool(flags.session_present)
            if wrapped is not None:
                wrapped(c, userdata, flags, reason, properties)

        inner.on_connect = on_connect

    def ack(self, mid: int, qos: int) -> None:
        self.client.ack(mid, qos)

    def flush(self) -> None:
        """Write queued acknowledgements now instead of on the next loop iteration: every
        millisecond between "durable" and "acknowledged" is a window for duplicates."""
        if self.client.want_write():
            self.client.loop_write()


def decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion
                   ) -> _packet.PublishPacket:
    """paho's `_packet.decode_publish` (point 4 above), copying the payload once."""
    view = memoryview(packet)
    malformed = MalformedPacket
    if len(view) < 2:
        raise malformed("PUBLISH too short for its topic length")
    slen = int.from_bytes(view[:2], "big")
    pos = 2 + slen
    if pos > len(view):
        raise malformed("PUBLISH topic runs past the packet")
    topic = bytes(view[2:pos])
    if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
        raise malformed("topic can't be empty in MQTTv3")
    qos = (header & 0x06) >> 1
    mid = 0
    if qos > 0:
        if pos + 2 > len(view):
            raise malformed("PUBLISH too short for its packet id")
        mid = int.from_bytes(view[pos:pos + 2], "big")
        pos += 2
    properties = None
    if protocol == MQTTProtocolVersion.MQTTv5:
        length, used = _variable_int(view, pos)
        if pos + used + length > len(view):
            raise malformed("PUBLISH properties run past the packet")
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        try:
            properties.unpack(bytes(view[pos:pos + used + length]))  # type: ignore[no-untyped-call]
        except MalformedPacket:
            raise
        except MQTTException as e:
            raise malformed(str(e)) from None
        pos += used + length
    return _packet.PublishPacket(
        dup=bool(header & 0x08), qos=qos, retain=bool(header & 0x01), topic=topic, mid=mid,
        properties=properties, payload=view[pos:].tobytes())


def _variable_int(view: memoryview, pos: int) -> tuple[int, int]:
    """An MQTT Variable Byte Integer at `pos`: (value, bytes used)."""
    value = 0
    for i in range(4):
        if pos + i >= len(view):
            break
        byte = view[pos + i]
        value += (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    raise MalformedPacket("bad variable byte integer in PUBLISH properties")


_ORIGINAL_DECODE_PUBLISH = _packet.decode_publish
_packet.decode_publish = decode_publish
