"""Tip objects: the site's signed word on its own history (docs/FORMAT.md, "Tip objects").

A tip says, for one numbering stream of a site (agent/store/seqbook.py): the highest manifest seq
issued, the seqs still queued at the site, and the seqs that are void (will never have a
manifest). The cloud reads the newest tip to tell a missing manifest from one still on its way
or one that was never going to come. Tips are create-only `<site>/tips/<stream>/<n>` objects,
sealed to the recipient key like manifests (sealed kind 3) and signed with the site key under
their own signature context, so a tip can never pass for a manifest or the other way round.

This is the format both sides share; the site's publisher is agent/uplink/tips.py.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import CryptoError, FormatError
from agent.format import crypto
from agent.format.crypto import EdgeKeys
from agent.format.manifest import STREAM_ID
from agent.format.signed import open_signed, record_fields

TIP_VERSION = 1
TIP_CONTEXT = b"skyferry/v2/tip\x00"
MAX_TIP_BYTES = 8 << 20  # sealed or opened; ~300,000 ranges
MAX_RANGES = 100_000  # per list; beyond, the closest ranges are merged (`coarsen`)
_DIGITS = 20  # tip numbers in keys are zero-padded: listing order is number order

Ranges = tuple[tuple[int, int], ...]


def tips_prefix(site: str, stream: str | None = None) -> str:
    return f"{site}/tips/" if stream is None else f"{site}/tips/{stream}/"


def tip_key(site: str, stream: str, n: int) -> str:
    return f"{tips_prefix(site, stream)}{n:0{_DIGITS}d}"


def parse_tip_key(key: str) -> tuple[str, str, int] | None:
    """(site, stream, n) of a well-formed tip key, else None."""
    parts = key.split("/")
    if (len(parts) != 4 or parts[1] != "tips" or not STREAM_ID.fullmatch(parts[2])
            or len(parts[3]) != _DIGITS or not parts[3].isdigit()):
        return None
    return parts[0], parts[2], int(parts[3])


@dataclass(frozen=True)
class Tip:
    site: str
    stream: str
    n: int
    created: str  # ISO-8601 UTC, when the site built it
    highest: int  # highest seq issued in the stream
    queued: Ranges  # inclusive [first, last] runs, ascending, disjoint
    void: Ranges

    def to_json(self) -> bytes:
        data = {"type": "tip", "version": TIP_VERSION, "site": self.site, "stream": self.stream,
                "n": self.n, "created": self.created, "highest": self.highest,
                "queued": [list(r) for r in self.queued], "void": [list(r) for r in self.void]}
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Tip:
        data = record_fields(raw, "tip", TIP_VERSION)
        for name, typ in (("site", str), ("stream", str), ("created", str), ("n", int),
                          ("highest", int)):
            if not isinstance(data.get(name), typ) or isinstance(data.get(name), bool):
                raise FormatError(f"tip field {name!r} is missing or not a {typ.__name__}")
        highest = data["highest"]
        if not STREAM_ID.fullmatch(data["stream"]) or data["n"] < 1 or highest < 0:
            raise FormatError("tip has a malformed stream, number or highest seq")
        return cls(data["site"], data["stream"], data["n"], data["created"], highest,
                   _ranges(data.get("queued"), highest, "queued"),
                   _ranges(data.get("void"), highest, "void"))


def _ranges(value: Any, highest: int, what: str) -> Ranges:
    if not isinstance(value, list):
        raise FormatError(f"tip field {what!r} must be a list of [first, last] ranges")
    if len(value) > MAX_RANGES:  # a site merges ranges beyond this (`coarsen`)
        raise FormatError(f"tip field {what!r} holds {len(value)} ranges, more than the "
                          f"{MAX_RANGES} a site sends")
    out: list[tuple[int, int]] = []
    last = 0
    for r in value:
        if (not isinstance(r, list) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or not last < r[0] <= r[1] <= highest):
            raise FormatError(f"tip field {what!r}: {r!r} is not an ascending, disjoint range "
                              f"within 1..{highest}")
        out.append((r[0], r[1]))
        last = r[1]
    return tuple(out)


def coarsen(ranges: list[tuple[int, int]], limit: int = MAX_RANGES) -> Ranges:
    """At most `limit` ranges: the ones with the smallest gaps between them are merged, so a
    tip stays small whatever the backlog. A merged-in seq is claimed queued (or void): that can
    hide a gap there, never invent one; it takes over 100,000 separate runs to happen."""
    if len(ranges) <= limit:
        return tuple(ranges)
    gaps = sorted(b[0] - a[1] for a, b in itertools.pairwise(ranges))
    cut = gaps[len(ranges) - limit - 1]  # merging every gap up to this leaves <= limit
    out = [ranges[0]]
    for first, last in ranges[1:]:
        if first - out[-1][1] <= cut:
            out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return tuple(out)


def seal_tip(tip: Tip, keys: EdgeKeys) -> bytes:
    body = tip.to_json()
    signed = keys.signing_key.sign(TIP_CONTEXT + body) + body
    packed = zstandard.ZstdCompressor(level=3).compress(signed)
    compression = crypto.COMPRESSION_ZSTD
    if len(packed) >= len(signed):
        packed, compression = signed, crypto.COMPRESSION_NONE
    return crypto.seal(packed, keys.recipient_public, kind=crypto.KIND_TIP,
                       compression=compression, plaintext_len=len(signed))


def open_tip(key: str, blob: bytes, recipient: X25519PrivateKey,
             site_key: Ed25519PublicKey) -> Tip:
    """Decrypt, bound, check the signature and parse; the tip must be the one its key names."""
    where = parse_tip_key(key)
    if where is None:
        raise FormatError(f"{key} is not a tip key (<site>/tips/<stream>/<20-digit number>)")
    body = open_signed(key, blob, recipient, site_key, kind=crypto.KIND_TIP,
                       context=TIP_CONTEXT, cap=MAX_TIP_BYTES, what="tip")
    tip = Tip.from_json(body)
    if (tip.site, tip.stream, tip.n) != where:
        raise CryptoError(f"{key}: tip {tip.site}/{tip.stream}/{tip.n} was moved here")
    return tip
