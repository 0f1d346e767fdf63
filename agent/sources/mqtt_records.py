"""MQTT messages between receipt and acknowledgement, and the JSON Lines object they become.

The encoder holds at most one more copy of a message than the message itself (plus 1 MiB):
a payload up to `[mqtt] max_message_size` is escaped (or base64-encoded) a piece at a time into
one growing buffer, whose bytes become the object body without a further copy.
"""

from __future__ import annotations

import base64
import codecs
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_PIECE = 3 << 18  # 768 KiB: a multiple of 3, so base64 pieces join without padding


@dataclass(slots=True)
class Received:
    """One message between receipt and acknowledgement."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_ns: int
    mid: int
    generation: int  # connection that delivered it; acks go only to that connection
    durable: bool = False


def encode_jsonl(records: list[Received]) -> bytes:
    """The object body: one JSON object per message, in the order they arrived.

    Each line is what `json.dumps({"topic", "qos", "retain", "received", "payload"},
    ensure_ascii=False, separators=(",", ":"))` gives, with `payload_base64` instead of
    `payload` for a payload that is not UTF-8.
    """
    out = io.BytesIO()
    for r in records:
        head: dict[str, Any] = {"topic": r.topic, "qos": r.qos, "retain": r.retain,
                                "received": _iso(r.received_ns)}
        start = out.tell()
        out.write(_dumps(head)[:-1].encode("utf-8"))
        out.write(b',"payload":"')
        if not _write_text(r.payload, out):
            out.seek(start)
            out.truncate()
            out.write(_dumps(head)[:-1].encode("utf-8"))
            out.write(b',"payload_base64":"')
            _write_base64(r.payload, out)
        out.write(b'"}\n')
    return out.getvalue()  # the buffer itself, not a copy


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _write_text(payload: bytes, out: io.BytesIO) -> bool:
    """Write the payload as the inside of a JSON string; False when it is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    view = memoryview(payload)
    try:
        for i in range(0, max(len(view), 1), _PIECE):
            text = decoder.decode(view[i:i + _PIECE], final=i + _PIECE >= len(view))
            out.write(_dumps(text)[1:-1].encode("utf-8"))
    except UnicodeDecodeError:
        return False
    return True


def _write_base64(payload: bytes, out: io.BytesIO) -> None:
    view = memoryview(payload)
    for i in range(0, len(view), _PIECE):
        out.write(base64.b64encode(view[i:i + _PIECE]))


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def batch_name_prefix(first_ns: int) -> str:
    """Fixed-width UTC time of the batch's first message: names sort in arrival order."""
    return datetime.fromtimestamp(first_ns / 1e9, UTC).strftime("%Y%m%dT%H%M%S.%fZ-")
