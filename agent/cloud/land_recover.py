"""After a crash: the events of landing records whose writer stopped before writing them.

A lander writes a pending marker, creates the landing record (which holds the events), writes
the events object, posts the events downstream (if configured) and removes the marker. A marker
still there means one of: the record was never created (the manifest lands again, with a new
marker of its own), or it was and its events may be missing or not posted (they are written
from the record, create-only: never twice; posted again: at least once).

With several workers, another worker's marker may be live. A marker is only looked at once it
is `min_age_s` old (a live worker's is gone within moments of being written), and removed only
when its record exists (its events are then made sure of) or, with no record, once it is
`orphan_s` old: removing a live worker's marker before its record exists could lose the events
of a record it then creates and stops before writing them.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from agent.backends.protocol import Backend
from agent.backends.retry import retrying
from agent.cloud import land_book as book
from agent.cloud.land_discover import listing
from agent.cloud.land_events import Downstream, forget
from agent.errors import ObjectNotFoundError

log = logging.getLogger("skyferry.land")
MAX_RECORD = 64 << 20


async def recover_events(dest: Backend, downstream: Downstream | None = None,
                         min_age_s: float = 0.0, orphan_s: float = 0.0) -> int:
    """Write (and post) the events of every pending landing; returns how many were written.
    One worker alone: both ages 0 (every marker is a stopped run's)."""
    written = 0
    now = datetime.now(UTC)
    for info in await listing(dest, book.pending_prefix()):
        try:
            body = await retrying(lambda: dest.get(info.key, max_size=1 << 16))  # noqa: B023
        except ObjectNotFoundError:
            continue  # its worker finished meanwhile
        age = book.pending_age_s(body, now)
        if age < min_age_s:
            continue
        site, rest = info.key[len(book.pending_prefix()):].split("/", 1)
        lines = await _record_events(dest, book.landed_key(site, rest.split(".", 1)[0]))
        if lines is None:
            if age >= orphan_s:
                await forget(dest, info.key)
            continue
        key, events = lines
        if key and events and await _write_once(dest, key, events):
            written += 1
            log.info("events of %s written after a stop", info.key,
                     extra={"event": "land_events_recovered", "object": info.key})
        if downstream is not None and events:
            await downstream.submit(events, info.key)
        else:
            await forget(dest, info.key)
    return written


async def _write_once(dest: Backend, key: str, events: list[dict[str, Any]]) -> bool:
    created: bool = await retrying(lambda: dest.put_if_absent(key, book.event_lines(events)))
    return created


async def _record_events(dest: Backend,
                         record_key: str) -> tuple[str, list[dict[str, Any]]] | None:
    """The events key and lines a landing record holds; None when there is no record."""
    try:
        blob = await retrying(lambda: dest.get(record_key, max_size=MAX_RECORD))
    except ObjectNotFoundError:
        return None  # not landed yet: the manifest is landed again, with its events
    try:
        record = json.loads(blob)
        return str(record["events"] or ""), list(record["event_lines"] or [])
    except (ValueError, KeyError, TypeError):
        log.warning("landing record %s unreadable: its events are not recovered", record_key,
                    extra={"event": "land_record_unreadable", "object": record_key})
        return "", []
