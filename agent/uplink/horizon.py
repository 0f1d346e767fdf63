"""The edge's half of retention (docs/FORMAT.md, "Retention"): before a manifest is sent, every
chunk it references must have a copy in the cloud confirmed within the dedup horizon.

A chunk whose last confirmed copy is older (or was never confirmed: it was found already there,
or the clock stepped back) is sent again from its local copy, create-only, to a key of its own
under `<chunk key>.copies/` (agent/format/layout.py): the cloud never refreshes an object that
exists, so only a new key gives a new Last-Modified. Readers fall back to the copies when the
chunk's own key is gone (agent/cloud/restore_read.py). This runs inside each attempt to send
the manifest, so however long the attempts take, the one that succeeds began within the horizon.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from agent.backends.protocol import Backend
from agent.errors import TransientBackendError
from agent.format import layout
from agent.host.blocking import RunBlocking
from agent.obs.logs import log_event
from agent.store.horizon import StaleChunk
from agent.store.store import Store

log = logging.getLogger("skyferry.uplink")

MAX_ROUNDS = 8  # of re-sends before one check finds every chunk within the horizon
ReadChunk = Callable[[StaleChunk], bytes]  # the local sealed file, checked against the index


class Refresher:
    def __init__(self, site: str, store: Store, backend: Backend, run_blocking: RunBlocking,
                 clock: Callable[[], float], horizon_s: float, read: ReadChunk) -> None:
        self.site, self.store, self.backend = site, store, backend
        self.run_blocking, self.clock, self.horizon_s, self.read = (
            run_blocking, clock, horizon_s, read)
        self.resent = 0  # copies sent (for tests and status)

    async def refresh(self, object_id: str) -> int:
        """Re-send the chunks of `object_id` past the horizon; returns how many were sent.

        Checked again after each round of re-sends, until a check finds none: re-sending can
        take long on a slow link, and the manifest must go right after a check that passed.
        """
        sent = 0
        warned: set[str] = set()
        for _ in range(MAX_ROUNDS):
            stale: list[StaleChunk] = await self.run_blocking(
                self.store.stale_chunks, object_id, self.clock(), self.horizon_s)
            for chunk in stale:
                if not chunk.has_file and chunk.chunk_id not in warned:
                    # Only an object queued before the store kept copies: its manifest declares
                    # no horizon, and no lander deletes this site's chunks until none is left.
                    warned.add(chunk.chunk_id)
                    log_event(log, logging.WARNING, "horizon_no_copy",
                              "chunk past the dedup horizon has no local copy: sent as it is",
                              chunk=chunk.chunk_id, object=object_id)
            resend = [c for c in stale if c.has_file]
            if not resend:
                return sent
            for chunk in resend:
                await self._resend(chunk, object_id)
                sent += 1
        raise TransientBackendError(
            f"object {object_id}: its chunks keep passing the dedup horizon while they are sent "
            f"again ({self.horizon_s:g}s); the manifest waits for the next attempt", "horizon")

    async def _resend(self, chunk: StaleChunk, object_id: str) -> None:
        data: bytes = await self.run_blocking(self.read, chunk)
        started = self.clock()
        key = layout.chunk_copy_key(self.site, chunk.chunk_id, started, secrets.token_hex(4))
        result = await self.backend.put_new(key, data)
        await self.backend.verify_written(key, len(data), result.etag)
        if result.written:  # a fresh key: the copy's Last-Modified is after `started`
            await self.run_blocking(self.store.chunk_confirmed, chunk.chunk_id, started)
        self.resent += 1
        log_event(log, logging.INFO, "chunk_resent",
                  "chunk past the dedup horizon sent again before its manifest",
                  chunk=chunk.chunk_id, object=object_id, bytes=len(data), key=key)
