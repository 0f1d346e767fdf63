"""Newest version wins per name, with any number of workers landing at once.

The name record (`_skyferry/names/<site>/<sha256 of the path>`) only ever moves forward: a
worker *claims* it for its version by compare-and-swap (`Backend.put_if_match`) before it puts
the file, and a claim is refused when a newer version holds it. The file itself is a plain
overwrite (a multipart upload cannot be made conditional everywhere), so an older version's put
that finishes after a newer claim can leave older content under the name for a moment. Every
worker therefore *settles* each name after its put, and each name it skips as superseded: it
reads the record again and checks (HEAD) that the object holds the record's version; when not,
it lands that version again from the sealed store (the record names its manifest). A worker
killed before settling has not created its landing record, so its manifest is landed again
(queue redelivery, or the next backfill) and settles then. docs/FORMAT.md, "Landing
bookkeeping", states the rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from agent.backends.protocol import Backend, Tagged
from agent.backends.retry import retrying
from agent.cloud import land_book as book
from agent.errors import SkyferryError

MAX_RECORD = 1 << 16
MAX_SWAPS = 50  # compare-and-swap attempts on one name before giving up (then retried later)


class LandError(SkyferryError):
    """The destination refused what was landed (an operational error, not a bad object)."""


@dataclass(frozen=True)
class NameRecord:
    """Which version a name holds, where to find it again, and what its content hashes to."""

    version: book.Version
    manifest: str = ""  # the sealed manifest's key ("" in records of the first lander)
    sha256: str = ""

    def to_json(self) -> bytes:
        d = json.loads(self.version.to_json())
        d.update(manifest=self.manifest, sha256=self.sha256)
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> NameRecord | None:
        version = book.Version.from_json(blob)
        if version is None:
            return None
        d = json.loads(blob)
        return cls(version, str(d.get("manifest") or ""), str(d.get("sha256") or ""))


Read = tuple[NameRecord | None, Tagged | None]  # a name's record, and its bytes and tag


async def read(dest: Backend, key: str) -> Read:
    found = await retrying(lambda: dest.get_tagged(key, max_size=MAX_RECORD))
    return (NameRecord.from_json(found.data) if found else None), found


async def claim(dest: Backend, key: str, mine: NameRecord, known: Read | None = None
                ) -> NameRecord | None:
    """Make `mine` the name's record unless a newer version holds it.

    None: the record is `mine` now (written here, or it already was: the same version landing
    twice). Otherwise the newer record that keeps this version from landing. `known`: what
    `read` returned a moment ago, tried first instead of reading again; if the record has moved
    since, the swap is refused and it is read again (records only move forward, so an old read
    never shows a newer version than the record holds).
    """
    for attempt in range(MAX_SWAPS):
        held, found = known if known is not None and not attempt else await read(dest, key)
        if held is not None:
            if held.version == mine.version:
                return None
            if held.version.newer_than(mine.version):
                return held
        tag = found.etag if found else None
        if await retrying(lambda: dest.put_if_match(key, mine.to_json(), tag)):  # noqa: B023
            return None
    raise LandError(f"{dest.url}: {key}: {MAX_SWAPS} workers changed this name record while "
                    "this one tried to; will retry")


async def holds(dest: Backend, content_key: str, record: NameRecord) -> bool:
    """Does the object under the name hold the version its record names?"""
    if not record.sha256:
        return True  # a record of the first lander: nothing to compare, nothing to repair
    held = await retrying(lambda: dest.head(content_key))
    if held is None:
        return False
    return (held[1].get("object_id") == record.version.object_id
            and held[1].get("sha256") == record.sha256)
