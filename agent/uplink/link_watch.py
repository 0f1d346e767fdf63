"""How the uplink reads the link under its uploads: how many streams to run, when a lost link
leaves an upload held open (TCP resumes it) rather than cut, when a held upload is stuck in
TCP's retransmission backoff, and when the link has gone silent before the link monitor knows.

The kernel's view of this process's connections to the backend (`Backend.connections`) is the
evidence; the gate says whether the link is up and a window is open."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.backends.connections import Connection
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
# Loss of link from the uplink's own traffic (`LinkWatch.watch`): every connection with bytes
# under way has heard no acknowledgement for max(LOST_AFTER_S, LOST_AFTER_RTTS round trips),
# and TCP has timed out waiting (a retransmission timeout: not merely a receiver that stopped
# reading, whose zero-window probes are answered) or the silence has lasted twice as long.
# Where the kernel does not say when the last acknowledgement came (/proc only): a
# retransmission timeout without one, then LOST_AFTER_S more. Sampled every WATCH_EVERY_S.
LOST_AFTER_S = 0.8
LOST_AFTER_RTTS = 4
WATCH_EVERY_S = 0.1


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
        # Set by the daemon: tells the link monitor the link is lost (`watch`); the monitor's
        # probes say when it is back. None: nothing is watched.
        self.on_lost: Callable[[str], None] | None = None
        self.lost_at: float | None = None  # time.monotonic() of the last loss `watch` saw
        # Connections already silent when the gate last opened (`watch`): uploads held
        # through the outage, or cancelled ones whose bytes the kernel still tries to send.
        self.old: set[int] = set()

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
        conns = [c for c in self.backend.connections() or [] if c.inode not in self.old]
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

    async def watch(self) -> None:
        """Notice a lost link from the uploads' own connections, long before probes would.

        Probes need seconds to be sure (an interval, timeouts, hysteresis), and a link that
        stops answering mid-upload is still "up" meanwhile. While uploads are under way and
        the gate is open, the kernel's view of this process's connections to the service is
        read every WATCH_EVERY_S: when each one with bytes queued has gone a retransmission
        timeout without an acknowledgement, and none comes for `_patience()` more, the link
        is reported lost (`on_lost`): the gate closes. Probes remain for an idle link, and
        they alone say when it is back.

        Connections already backing off when the gate opened (uploads held through the last
        outage, `ride_out`) are not evidence until one is acknowledged again: TCP may leave
        them waiting for seconds after the link returned.
        """
        if self.on_lost is None:
            return
        opened: float | None = None
        since: float | None = None
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            conns = self.backend.connections() if self.active and self.gate.is_open() else None
            if not conns:
                since = None
                continue
            patience = self._patience(conns)
            if self.gate.opened_at != opened:
                opened = self.gate.opened_at
                self.old = {c.inode for c in conns if _unanswered(c, patience)}
            self.old -= {c.inode for c in conns if not _unanswered(c, patience)}
            fresh = [c for c in conns if c.inode not in self.old]
            if not fresh or not all(_unanswered(c, patience) for c in fresh):
                since = None
                continue
            now = time.monotonic()
            since = now if since is None else since
            # The kernel's time since the last acknowledgement covers the wait already.
            if all(c.since_ack_s is not None for c in fresh) or now - since >= LOST_AFTER_S:
                since = None
                self._lost(len(fresh), patience)

    def _patience(self, conns: list[Connection]) -> float:
        """max(LOST_AFTER_S, LOST_AFTER_RTTS round trips): the round trip TCP measures on
        these connections (the probes' includes the service's own time to answer, seconds
        on a busy one); the probes' when the kernel does not say."""
        rtts = [c.rtt_s for c in conns if c.rtt_s is not None]
        rtt = max(rtts) if rtts else self.admission.rtt()
        return max(LOST_AFTER_S, LOST_AFTER_RTTS * (rtt or 0.0))

    def _lost(self, count: int, patience: float) -> None:
        self.lost_at = time.monotonic()
        reason = (f"the uplink's {count} connection(s) with data under way heard no "
                  f"acknowledgement for {patience:.1f} s or more")
        log_event(log, logging.INFO, "link_silent", reason, connections=count)
        assert self.on_lost is not None
        self.on_lost(reason)


def _unanswered(c: Connection, patience: float) -> bool:
    """Bytes under way (or a handshake), and the far end silent for `patience` (see
    LOST_AFTER_S); without the kernel's time of the last acknowledgement, a retransmission
    timeout since it."""
    if not (c.queued > 0 or c.connecting):
        return False
    if c.connecting or c.since_ack_s is None:
        return c.retransmits >= 1
    return c.since_ack_s >= patience and (c.retransmits >= 1 or c.since_ack_s >= 2 * patience)
