"""Tip objects: the site's signed word on its own history (docs/FORMAT.md, "Tip objects").

A tip says, for one numbering stream of a site (agent/store/seqbook.py): the highest manifest seq
issued, the seqs still queued at the site, and the seqs that are void (will never have a
manifest). The cloud reads the newest tip to tell a missing manifest from one still on its way
or one that was never going to come. Tips are create-only `<site>/tips/<stream>/<n>` objects,
sealed to the recipient key like manifests (sealed kind 3) and signed with the site key under
their own signature context, so a tip can never pass for a manifest or the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3
import zstandard
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import BackendError, CryptoError, DiskFullError, FormatError, ObjectConflictError
from agent.format import crypto
from agent.format.crypto import EdgeKeys
from agent.format.manifest import STREAM_ID, now_iso
from agent.obs.logs import log_event
from agent.store import seqbook
from agent.store.store import Store

if TYPE_CHECKING:
    from agent.uplink.uplink import Uplink

log = logging.getLogger("skyferry.uplink")

TIP_VERSION = 1
TIP_CONTEXT = b"skyferry/v2/tip\x00"
MAX_TIP_BYTES = 8 << 20  # sealed or opened; ~300,000 ranges
# Manifests are acknowledged in bursts: a tip goes out this long after the last one asked for
# it, so a window's manifests cost a few tips, not one each.
TIP_SETTLE_S = 0.5
TIP_INTERVAL_S = 5.0
TIP_LINK_SHARE = 100
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
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # also integers or nesting beyond the parser
            raise FormatError(f"tip is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("type") != "tip":
            raise FormatError("not a tip object")
        if data.get("version") != TIP_VERSION:
            raise FormatError(f"tip version {data.get('version')!r} is not supported "
                              f"(this skyferry reads {TIP_VERSION})")
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
    from agent.format.codec import decompress  # the one bounded decompression of this package

    where = parse_tip_key(key)
    if where is None:
        raise FormatError(f"{key} is not a tip key (<site>/tips/<stream>/<20-digit number>)")
    if len(blob) > MAX_TIP_BYTES:
        raise FormatError(f"{key} is {len(blob)} bytes, over the {MAX_TIP_BYTES}-byte tip cap")
    header, payload = crypto.open_sealed(blob, recipient)
    if header.kind != crypto.KIND_TIP:
        raise FormatError(f"{key} holds sealed kind {header.kind}, not a tip")
    if header.plaintext_len > MAX_TIP_BYTES:
        raise FormatError(f"{key} claims a {header.plaintext_len}-byte tip: over the cap")
    signed = bytes(decompress(header.compression, payload, header.plaintext_len))
    signature, body = signed[:crypto.SIGNATURE_SIZE], signed[crypto.SIGNATURE_SIZE:]
    try:
        site_key.verify(signature, TIP_CONTEXT + body)
    except InvalidSignature:
        raise CryptoError(f"{key}: tip signature does not verify with the site's key") from None
    tip = Tip.from_json(body)
    if (tip.site, tip.stream, tip.n) != where:
        raise CryptoError(f"{key}: tip {tip.site}/{tip.stream}/{tip.n} was moved here")
    return tip


@dataclass(frozen=True)
class BuiltTip:
    key: str
    blob: bytes
    stream: str
    n: int
    digest: str  # of what it says, to skip a tip that would say nothing new


class TipWriter:
    """Builds the site's next tip from the store (blocking: call it through the executor)."""

    def __init__(self, site: str, keys: EdgeKeys, store: Store) -> None:
        self.site, self.keys, self.store = site, keys, store
        self.key_id = seqbook.key_id(keys.signing_key.public_key())

    def build(self) -> BuiltTip | None:
        """The next tip, or None when there is no history yet or nothing changed since the
        last tip sent."""
        st = self.store.history_state(self.key_id)
        if st is None:
            return None
        queued, void = coarsen(st.queued), coarsen(st.void)
        digest = blake3.blake3(repr((st.highest, queued, void)).encode()).hexdigest()
        if self.store.get_meta(f"tip:{st.stream}") == digest:
            return None
        tip = Tip(self.site, st.stream, st.next_tip, now_iso(), st.highest, queued, void)
        return BuiltTip(tip_key(self.site, st.stream, tip.n), seal_tip(tip, self.keys),
                        st.stream, tip.n, digest)

    def sent(self, built: BuiltTip, written: bool) -> None:
        """Tip `n` is in the cloud (or its key was taken: the next tip takes n + 1)."""
        self.store.tip_sent(built.stream, built.n)
        if written:
            self.store.set_meta(f"tip:{built.stream}", built.digest)


async def tip_loop(uplink: Uplink) -> None:
    """Send a tip at each window opening and after manifests were acknowledged."""
    opened = -1
    while True:
        await uplink.gate.wait_open()
        if uplink.gate.windows_opened != opened:
            opened = uplink.gate.windows_opened
            uplink.tip_due.set()  # evictions and voids happen between windows too
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await uplink.tip_due.wait()
        if not uplink.tip_due.is_set():
            continue
        await asyncio.sleep(TIP_SETTLE_S)
        uplink.tip_due.clear()
        started = time.monotonic()
        try:
            await uplink._while_open(lambda: send_tip(uplink))
            # Tips are few: at least TIP_INTERVAL_S apart, and a large one (a fragmented
            # backlog) takes at most 1/TIP_LINK_SHARE of the link's time.
            took = time.monotonic() - started
            await asyncio.sleep(max(TIP_INTERVAL_S - took, took * (TIP_LINK_SHARE - 1)))
        except Exception as e:  # a tip never stops the uploads: one line per try
            uplink.tip_due.set()  # tried again after a pause
            known = isinstance(e, BackendError | DiskFullError)
            level = logging.WARNING if known else logging.ERROR
            log_event(log, level, "tip_failed", f"the site's tip was not sent: {e}; "
                      f"tried again in {uplink.settings.retry_max_s:g}s")
            await asyncio.sleep(uplink.settings.retry_max_s)


async def send_tip(uplink: Uplink) -> BuiltTip | None:
    """Build and send the site's tip if its history changed since the last one sent."""
    if uplink.tips is None:
        return None
    built: BuiltTip | None = await uplink.run_blocking(uplink.tips.build)
    if built is None:
        return None
    try:
        written = await uplink._with_retries(
            lambda n: uplink.backend.put_if_absent(built.key, built.blob, probe_first=n > 1))
    except ObjectConflictError:
        written = False  # the key is taken (not by this site): the next tip takes n + 1
    tips = uplink.tips

    async def record() -> None:
        await uplink.run_blocking(tips.sent, built, written)

    await uplink._shielded(record())
    if not written:
        uplink.tip_due.set()
        return None
    uplink.metrics.sent_bytes.labels("tip").inc(len(built.blob))
    log_event(log, logging.DEBUG, "tip_sent", "tip sent", key=built.key)
    return built
