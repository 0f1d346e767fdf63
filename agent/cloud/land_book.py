"""The lander's bookkeeping in the destination, under `<dest prefix>/_skyferry/`
(docs/FORMAT.md, "Landing bookkeeping"): landing records (create-only: who creates one emits
its events), the newest version landed per name, daily event objects and quarantine reports."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from agent.format.manifest import KIND_MQTT_BATCH, Manifest

BOOK = "_skyferry"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def landed_prefix(site: str) -> str:
    return f"{BOOK}/landed/{site}/"


def landed_key(site: str, object_id: str) -> str:
    return f"{landed_prefix(site)}{object_id}"


def quarantine_prefix(site: str) -> str:
    return f"{BOOK}/quarantine/{site}/"


def quarantine_key(sealed_key: str) -> str:
    """One report per sealed object: the site is its first key component."""
    return f"{quarantine_prefix(sealed_key.split('/', 1)[0])}{_sha(sealed_key)}.json"


def name_key(site: str, path: str) -> str:
    """Where the newest version of `path` (below the site's folder) is recorded."""
    return f"{BOOK}/names/{site}/{_sha(path)}"


def pending_prefix() -> str:
    return f"{BOOK}/pending/"


def pending_key(site: str, object_id: str, worker: str) -> str:
    """Written before a landing record is created, removed once its events are written: one
    left behind names a record whose events a crash may have kept from being written."""
    return f"{pending_prefix()}{site}/{object_id}.{worker}"


def pending_body(sealed_key: str) -> bytes:
    return json.dumps({"manifest": sealed_key, "at": now_iso()}).encode()


def pending_age_s(body: bytes, now: datetime) -> float:
    """How long ago a marker was written; a marker without a time (the first lander's) is
    taken as old."""
    try:
        at = datetime.fromisoformat(str(json.loads(body)["at"]))
    except (ValueError, KeyError, TypeError):
        return float("inf")
    return (now - at).total_seconds()


def events_key(day: str, worker: str, n: int) -> str:
    return f"{BOOK}/events/{day}/{worker}-{n}.jsonl"


def dest_parts(m: Manifest, name: str) -> tuple[str, ...]:
    """<site>/<source>/<name>; an MQTT batch as <site>/mqtt/<source>/<name>.jsonl."""
    if m.kind == KIND_MQTT_BATCH:
        leaf = name if name.endswith(".jsonl") else f"{name}.jsonl"
        return (m.site, "mqtt", m.source, *leaf.split("/"))
    return (m.site, m.source, *name.split("/"))


@dataclass(frozen=True)
class Version:
    """Which version of a name a file is: newer sorts later (`newer_than`)."""

    created: str
    stream: str
    seq: int
    object_id: str
    entry: int

    @classmethod
    def of(cls, m: Manifest, entry: int) -> Version:
        return cls(m.created, m.stream, m.seq, m.object_id, entry)

    def newer_than(self, other: Version) -> bool:
        """Within one numbered stream by seq (clocks may step back); otherwise by creation
        time, then object id and place in a pack, as restore orders versions."""
        if self.stream and self.stream == other.stream and self.seq and other.seq:
            return (self.seq, self.entry) > (other.seq, other.entry)
        return ((_utc(self.created), self.object_id, self.entry)
                > (_utc(other.created), other.object_id, other.entry))

    def to_json(self) -> bytes:
        return json.dumps({"created": self.created, "entry": self.entry,
                           "object_id": self.object_id, "seq": self.seq,
                           "stream": self.stream}).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> Version | None:
        """None for a record this version of the lander cannot read (it is then replaced)."""
        try:
            d = json.loads(blob)
            return cls(str(d["created"]), str(d["stream"]), int(d["seq"]),
                       str(d["object_id"]), int(d["entry"]))
        except (ValueError, KeyError, TypeError):
            return None


def _utc(created: str) -> str:
    try:
        return datetime.fromisoformat(created).astimezone(UTC).isoformat()
    except ValueError:
        return created


@dataclass(frozen=True)
class Landed:
    """One file as it landed: what its event and its landing record say."""

    key: str
    size: int
    sha256: str
    mtime_ns: int
    site: str
    source: str
    object_id: str
    manifest_created: str

    def metadata(self) -> dict[str, str]:
        """The destination object's user metadata (metadata-safe ASCII keys)."""
        return {"mtime": str(self.mtime_ns), "sha256": self.sha256, "site": _ascii(self.site),
                "source": _ascii(self.source), "object_id": self.object_id,
                "manifest_created": self.manifest_created}

    def event(self, event_id: str, when: str) -> dict[str, Any]:
        return {"id": event_id, "type": "landed", "landed_at": when, **vars(self)}


def _ascii(value: str) -> str:
    """Metadata headers carry ASCII only: anything else is percent-encoded (UTF-8)."""
    plain = value.isascii() and value.isprintable() and value == value.strip()
    return value if plain else quote(value, safe="")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def landing_record(sealed_key: str, files: list[Landed], superseded: list[str],
                   events: str | None, lines: list[dict[str, Any]]) -> bytes:
    """The record also holds its events, so they can be written again after a crash."""
    return json.dumps({
        "manifest": sealed_key, "when": now_iso(), "events": events, "event_lines": lines,
        "files": [{"key": f.key, "size": f.size, "sha256": f.sha256} for f in files],
        "superseded": superseded,
    }, ensure_ascii=False).encode()  # not indented: json's C encoder does no indentation


def event_lines(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n"
                   for e in lines).encode()


def quarantine_report(sealed_key: str, reason: str, files: dict[str, str]) -> bytes:
    return json.dumps({"sealed_key": sealed_key, "reason": reason, "files": files,
                       "when": now_iso()}, ensure_ascii=False, indent=1).encode()
