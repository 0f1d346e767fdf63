"""After a crash: the events of landing records whose writer stopped before writing them.

A lander writes a pending marker, creates the landing record (which holds the events), writes
the events object, and removes the marker. A marker still there at a backfill means one of: the
record was never created (the manifest lands again: the marker goes), or it was and its events
may be missing (they are written from the record, create-only: never twice).
"""

from __future__ import annotations

import json
import logging

from agent.backends.protocol import Backend
from agent.backends.retry import retrying
from agent.cloud import land_book as book
from agent.cloud.land_discover import listing
from agent.errors import ObjectNotFoundError

log = logging.getLogger("skyferry.land")
MAX_RECORD = 64 << 20


async def recover_events(dest: Backend) -> int:
    """Write the missing events of every pending landing; returns how many were written."""
    written = 0
    for info in await listing(dest, book.pending_prefix()):
        site, rest = info.key[len(book.pending_prefix()):].split("/", 1)
        object_id = rest.split(".", 1)[0]
        if await _write_events(dest, book.landed_key(site, object_id)):
            written += 1
        await retrying(lambda: dest.delete(info.key))  # noqa: B023 (awaited at once)
    return written


async def _write_events(dest: Backend, record_key: str) -> bool:
    try:
        blob = await retrying(lambda: dest.get(record_key, max_size=MAX_RECORD))
    except ObjectNotFoundError:
        return False  # not landed yet: the manifest is landed again, with its events
    try:
        record = json.loads(blob)
        key, lines = record["events"], record["event_lines"]
    except (ValueError, KeyError, TypeError):
        log.warning("landing record %s unreadable: its events are not recovered", record_key,
                    extra={"event": "land_record_unreadable", "object": record_key})
        return False
    if not key or not lines:
        return False
    written = await retrying(lambda: dest.put_if_absent(key, book.event_lines(lines)))
    if written:
        log.info("events of %s written after a stop", record_key,
                 extra={"event": "land_events_recovered", "object": record_key})
    return bool(written)
