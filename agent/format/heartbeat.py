"""Heartbeat objects: a site's signed word on its own health (docs/FORMAT.md, "Heartbeats").

At each window (and every few minutes while one stays open) a site uploads a small heartbeat:
its queue by class, the age of its oldest queued object, free disk, errors since the last
heartbeat, how well its forecast did, its software version. The cloud's fleet view
(agent/cloud/fleet.py) reads the newest one per site. Heartbeats are create-only
`<site>/heartbeats/<YYYY>/<MM>/<DD>/<HHMMSSffffff>-<seq>` objects, sealed to the recipient key
like tips (sealed kind 4) and signed with the site key under their own signature context, so a
heartbeat can never pass for a manifest or a tip, nor the other way round. Nothing that restore
or verify reads is under `heartbeats/`: they are ignored there.

This is the format both sides share; the site's publisher is agent/uplink/heartbeat.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import CryptoError, FormatError
from agent.format import crypto
from agent.format.codec import compress_small
from agent.format.crypto import EdgeKeys
from agent.format.signed import open_signed, record_fields

HEARTBEAT_VERSION = 1
HEARTBEAT_CONTEXT = b"skyferry/v2/heartbeat\x00"
MAX_HEARTBEAT_BYTES = 64 << 10  # sealed or opened; an honest one is well under 4 KiB
MAX_CLASSES = 64
FORECAST_BASES = ("learned", "windows", "always")
_NAME = re.compile(r"(\d{12})-(\d{1,19})")


def heartbeats_prefix(site: str, day: str | None = None) -> str:
    """`<site>/heartbeats/`, or one date folder of it (`day` as YYYY/MM/DD or YYYY/MM)."""
    return f"{site}/heartbeats/" if day is None else f"{site}/heartbeats/{day}/"


def heartbeat_key(site: str, created: datetime, seq: int) -> str:
    """Date folder, then time of day: listing order is creation order."""
    t = created.astimezone(UTC)
    return f"{site}/heartbeats/{t:%Y/%m/%d}/{t:%H%M%S%f}-{seq}"


@dataclass(frozen=True)
class ClassQueue:
    objects: int
    bytes: int
    oldest_age_s: float | None  # the oldest queued object of the class, None when empty


@dataclass(frozen=True)
class Forecast:
    """How well the site's windows were predicted. `hit_ratio`: the learned model's share of
    forecast up-time the link confirmed (basis "learned"); without a learned model, the share of
    the predicted windows seen since the daemon started in which the link came up (basis
    "windows"); None with nothing to score (basis "always": the link is not scheduled)."""

    hit_ratio: float | None
    basis: str | None
    windows_predicted: int = 0
    windows_link_up: int = 0


@dataclass(frozen=True)
class Heartbeat:
    site: str
    seq: int  # 1, 2, 3, ... per site store
    created: str  # ISO-8601 UTC
    software: str  # skyferry's version
    queue: dict[str, ClassQueue]  # queued objects by class
    oldest_queued_age_s: float | None
    disk_free_bytes: int  # in the file system of state_dir
    store_used_bytes: int
    errors: int  # errors counted since the previous heartbeat (or the daemon's start)
    errors_by_kind: dict[str, int]
    forecast: Forecast
    interval_s: float  # the heartbeat cadence while a window is open
    next_window: str | None = None  # ISO-8601 UTC start of the next predicted window
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer version, kept

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.created)

    @property
    def key(self) -> str:
        return heartbeat_key(self.site, self.created_at, self.seq)

    @property
    def queued_objects(self) -> int:
        return sum(c.objects for c in self.queue.values())

    @property
    def queued_bytes(self) -> int:
        return sum(c.bytes for c in self.queue.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["extra"]
        return {"type": "heartbeat", "version": HEARTBEAT_VERSION, **data}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Heartbeat:
        data = record_fields(raw, "heartbeat", HEARTBEAT_VERSION)
        r = _Fields(data)
        created = r.text("created")
        try:
            when = datetime.fromisoformat(created)
        except ValueError:
            raise FormatError(f"heartbeat field 'created' is not an ISO-8601 time: "
                              f"{created!r}") from None
        if when.tzinfo is None:
            raise FormatError("heartbeat field 'created' has no time zone")
        queue = r.table("queue")
        if len(queue) > MAX_CLASSES:
            raise FormatError(f"heartbeat lists {len(queue)} classes, more than {MAX_CLASSES}")
        fc = r.table("forecast")
        f = _Fields(fc, "forecast.")
        basis = f.optional_text("basis")
        if basis is not None and basis not in FORECAST_BASES:
            raise FormatError(f"heartbeat forecast basis {basis!r} is not one of "
                              f"{', '.join(FORECAST_BASES)}")
        hb = cls(
            site=r.text("site"), seq=r.count("seq", 1), created=created,
            software=r.text("software"),
            queue={str(k): _class_queue(k, v) for k, v in queue.items()},
            oldest_queued_age_s=r.seconds("oldest_queued_age_s", optional=True),
            disk_free_bytes=r.count("disk_free_bytes"),
            store_used_bytes=r.count("store_used_bytes"), errors=r.count("errors"),
            errors_by_kind={str(k): _Fields({"n": v}, f"errors_by_kind.{k}").count("n")
                            for k, v in r.table("errors_by_kind").items()},
            forecast=Forecast(f.ratio("hit_ratio"), basis, f.count("windows_predicted"),
                              f.count("windows_link_up")),
            interval_s=r.seconds("interval_s") or 0.0,
            next_window=r.optional_text("next_window"),
            extra={k: v for k, v in data.items() if k not in _KNOWN})
        return hb


_KNOWN = {"type", "version", "site", "seq", "created", "software", "queue",
          "oldest_queued_age_s", "disk_free_bytes", "store_used_bytes", "errors",
          "errors_by_kind", "forecast", "interval_s", "next_window"}


def _class_queue(name: object, value: object) -> ClassQueue:
    if not isinstance(value, dict):
        raise FormatError(f"heartbeat queue entry {name!r} must be an object")
    f = _Fields(value, f"queue.{name}.")
    return ClassQueue(f.count("objects"), f.count("bytes"),
                      f.seconds("oldest_age_s", optional=True))


class _Fields:
    """Typed reads of one JSON object's fields; a wrong one is a FormatError naming it."""

    def __init__(self, data: dict[str, Any], where: str = "") -> None:
        self.data, self.where = data, where

    def _bad(self, name: str, what: str) -> FormatError:
        return FormatError(f"heartbeat field {self.where + name!r} is missing or not {what}")

    def text(self, name: str) -> str:
        v = self.data.get(name)
        if not isinstance(v, str) or not v or len(v) > 200:
            raise self._bad(name, "a short string")
        return v

    def optional_text(self, name: str) -> str | None:
        return None if self.data.get(name) is None else self.text(name)

    def count(self, name: str, least: int = 0) -> int:
        v = self.data.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or not least <= v < 1 << 63:
            raise self._bad(name, f"an integer >= {least}")
        return v

    def seconds(self, name: str, optional: bool = False) -> float | None:
        v = self.data.get(name)
        if v is None and optional:
            return None
        if (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)
                or v < 0):
            raise self._bad(name, "a number of seconds >= 0")
        return float(v)

    def ratio(self, name: str) -> float | None:
        v = self.data.get(name)
        if v is None:
            return None
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= 1:
            raise self._bad(name, "a ratio from 0 to 1")
        return float(v)

    def table(self, name: str) -> dict[str, Any]:
        v = self.data.get(name)
        if not isinstance(v, dict):
            raise self._bad(name, "an object")
        return v


def seal_heartbeat(hb: Heartbeat, keys: EdgeKeys) -> bytes:
    body = hb.to_json()
    signed = keys.signing_key.sign(HEARTBEAT_CONTEXT + body) + body
    compression, payload = compress_small(signed)
    return crypto.seal(payload, keys.recipient_public, kind=crypto.KIND_HEARTBEAT,
                       compression=compression, plaintext_len=len(signed))


def open_heartbeat(key: str, blob: bytes, recipient: X25519PrivateKey,
                   site_key: Ed25519PublicKey) -> Heartbeat:
    """Bound, decrypt, check the signature and parse; the heartbeat must be the one its key
    names (site, date folder, time and seq), so an old one copied to a newer name is refused."""
    body = open_signed(key, blob, recipient, site_key, kind=crypto.KIND_HEARTBEAT,
                       context=HEARTBEAT_CONTEXT, cap=MAX_HEARTBEAT_BYTES, what="heartbeat")
    hb = Heartbeat.from_json(body)
    if hb.key != key:
        raise CryptoError(f"{key}: heartbeat {hb.key} was moved here")
    return hb


def parse_heartbeat_key(key: str) -> tuple[str, str] | None:
    """(site, YYYY/MM/DD) of a well-formed heartbeat key, else None."""
    parts = key.split("/")
    if (len(parts) != 6 or parts[1] != "heartbeats" or not _NAME.fullmatch(parts[5])
            or not all(p.isdigit() for p in parts[2:5])):
        return None
    return parts[0], "/".join(parts[2:5])
