"""How the uplink reads the link under its uploads: how many streams to run, when a lost link
leaves an upload held open (TCP resumes it) rather than cut, when a held upload is stuck in
TCP's retransmission backoff, and when the link has gone silent before the link monitor knows.

The kernel's view of this process's connections to the backend (`Backend.connections`) is the
evidence; the gate says whether the link is up and a window is open."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from agent.backends.protocol import Backend
from agent.obs.logs import log_event
from agent.store.store import ChunkWork
from agent.uplink.budget import Admission
from agent.uplink.gate import Clock, Gate

log = logging.getLogger("skyferry.uplink")
LONG_PATH_S = 0.02  # a round trip from here on: keep two streams (`LinkWatch.streams`)
# A held upload (`ride_out`) whose connection is still in TCP's retransmission backoff this
# long after the link came back, while nothing else is being sent, is sent again instead.
STALL_GRACE_S = 1.0
STALL_NEXT_TRY_S = 0.5  # ... and only if TCP's next try is further off than this (and
# than sending the whole chunk again would take)
# While every connection with bytes under way has gone unanswered this many retransmission
# timeouts in a row, the link is most likely gone (before the link monitor is sure): start
# nothing new, look again after SILENT_RECHECK_S.
SILENT_RETRANSMITS = 2
SILENT_RECHECK_S = 0.25


class LinkWatch:
    def __init__(self, gate: Gate, backend: Backend, admission: Admission, clock: Clock,
                 max_streams: int) -> None:
        self.gate = gate
        self.backend = backend
        self.admission = admission
        self.clock = clock
        self.max_streams = max_streams
        self.riding = 0  # uploads kept open through a lost link (`ride_out`)
        self.active = 0  # uploads under way (held ones included)

    @contextmanager
    def upload(self) -> Iterator[None]:
        """Count one upload under way for as long as the block runs."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def streams(self) -> int:
        """How many workers may claim work now."""
        wanted = self.admission.streams_wanted()
        rtt = self.admission.rtt()
        if rtt is not None and rtt >= LONG_PATH_S:
            # A lone stream leaves the link idle between two chunks for several round trips
            # (the answer, the read-back, the index, the next claim), a share of the link's
            # time that grows with the path's delay. A second stream keeps the link busy.
            wanted = max(wanted, min(2, self.max_streams))
        # Uploads kept open through a lost link do not hold back fresh ones once it is back.
        return wanted + self.riding

    def rides_out(self, work: ChunkWork, in_flight: set[str]) -> bool:
        """Keep this upload open while the gate is closed?

        Only when the link was lost (not at a window's end or a pause), for a chunk whose
        request is under way, to a backend over a network: a TCP connection outlives an outage
        of seconds to minutes (an intermittent LEO link), a folder has no wire to resume on.
        """
        if work.chunk_id not in in_flight:
            return False
        state = self.gate.state()
        in_window = state.window is not None or state.flushing
        return (not state.link_up and not state.paused and in_window
                and not self.backend.url.startswith("file:"))

    async def ride_out(self, work: ChunkWork, upload: asyncio.Task[bool]) -> bool:
        """Wait for an upload the link left mid-way; False if a window end or pause cuts it,
        or if it stays stalled after the link is back (`stalled`).

        Meanwhile it does not count as one of the streams: once the link is back, other
        workers start at once while TCP (maybe still backing off) finishes this one; a request
        that never resumes ends at the backend's deadline and is retried.
        """
        log_event(log, logging.INFO, "upload_held", "link lost mid-upload: the request stays "
                  "open and resumes with the link", chunk=work.chunk_id, object=work.object_id)
        self.riding += 1
        try:
            while not upload.done():
                state = self.gate.state()
                if state.paused or (state.window is None and not state.flushing):
                    return False
                if self.stalled(work.sealed_size):
                    log_event(log, logging.INFO, "upload_stalled", "the link is back but this "
                              "upload's connection still waits out TCP's retransmission "
                              "backoff, and nothing else is being sent: sending it again on a "
                              "fresh connection", chunk=work.chunk_id, object=work.object_id)
                    return False
                await asyncio.wait({upload}, timeout=0.25)
            return True
        finally:
            self.riding -= 1

    def silent(self) -> bool:
        """Has the link gone silent under the uploads, before the link monitor noticed?

        The monitor needs a few seconds to be sure (probe interval, timeouts, hysteresis).
        A request begun meanwhile waits in the void and TCP's backoff, and when the link
        returns may find that the server closed its pooled connection, failing after part of
        its body crossed: sent twice. Held uploads (`ride_out`) are not counted: once the
        link is back their connections may still be backing off while fresh ones move.
        """
        conns = self.backend.connections()
        if not conns:
            return False
        silent = [c for c in conns if c.retransmits >= SILENT_RETRANSMITS]
        return len(silent) == len(conns) and len(silent) > self.riding

    def stalled(self, nbytes: int) -> bool:
        """Are the held uploads stuck in TCP's retransmission backoff on a link that is back?

        After a silent outage (a black hole) TCP retries at exponentially growing intervals,
        so a request may sit idle for seconds after the link returned. While other uploads
        keep the link busy that costs nothing and waiting wastes nothing; once nothing else is
        being sent it costs link time, and sending the chunk again costs at most the chunk in
        flight. The kernel's view of this process's connections to the service tells a
        backed-off connection (no acknowledgement since its last timeout) from one that moves,
        and when TCP will try again: the upload is sent again only if that is further off than
        sending all `nbytes` again would take (what had crossed is not known).
        """
        back = self.gate.opened_at
        if (not self.gate.is_open() or back is None
                or time.monotonic() - back < STALL_GRACE_S or self.active > self.riding):
            return False
        conns = self.backend.connections()
        if conns is None:
            return False
        rate, _ = self.admission.planning_rate(self.clock())
        wait_s = max(STALL_NEXT_TRY_S, nbytes / rate if rate else 0.0)
        stalled = [c for c in conns if c.stalled and c.next_retransmit_s >= wait_s]
        # Connections cannot be matched to requests: act only when there are as many stalled
        # connections as held uploads (a resumed one would leave one fewer).
        return len(stalled) >= self.riding
