"""Spending a window well: its byte budget, admission of work that fits, and stream sizing.

A window that ends at LOS can carry about `seconds left x rate` bytes. The uplink asks
`Admission.claim` for work instead of taking the next unit blindly, and gets only work that
fits what is left of that budget after everything already in flight:
- a chunk is begun only if it (with the manifest of its object, so the object can still be
  committed) can be finished before the window's end minus `post_pass_s`;
- a manifest (the commit of an object whose chunks are all up) may use the window to its end;
- so a window ends on committed objects whenever the budget allows, and a chunk that would be
  cut at LOS (and sent again in full next time) is never begun.
The rate planned with is the delivered throughput measured on this link (`RateMeter`, all
streams together), bounded by the window's and the uplink's rate caps; with no measurement yet,
the window's own rate, else the uplink cap; with nothing known, work is admitted freely.
A safety factor and one round trip per request cover the estimate's error.

Windows without an end (mode "always", an operator's flush) have no budget.

`streams_wanted` sizes the number of parallel uploads to the bandwidth-delay product: enough
chunks in flight that the link never idles while a stream is between two chunks (about
`PER_CHUNK_RTTS` round trips, which small chunks on a long path feel most), then adjusted
by a small hill climb on the measured throughput (more streams while they help).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.store.store import ChunkWork, Store, Work
from agent.windows import Contact

Clock = Callable[[], float]
SAFETY = 0.9  # plan with 90% of the expected rate
DEFAULT_CHUNK = 4 << 20  # until chunks have been seen: the default average chunk size
PER_CHUNK_RTTS = 3  # round trips a stream spends between two chunks (`bdp_streams`)


class RateMeter:
    """Aggregate delivered throughput of the most recent transfers, all streams together.

    Bytes divided by the time during which at least one transfer was running (the union of
    their intervals): four streams each taking 4 s over 1 MB concurrently is 1 MB/s, not 4.
    Kept across windows, so a pass starts with what the last one measured.
    """

    def __init__(self, keep: int = 48, min_bytes: int = 64 << 10, min_busy_s: float = 0.05,
                 clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.min_bytes = min_bytes
        self.min_busy_s = min_busy_s
        self._transfers: deque[tuple[float, float, int]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def record(self, nbytes: int, started: float, finished: float) -> None:
        with self._lock:
            self._transfers.append((started, finished, nbytes))

    def rate(self) -> float | None:
        with self._lock:
            items = sorted(self._transfers)
        total = sum(n for _, _, n in items)
        busy = 0.0
        cur_a = cur_b = None
        for a, b, _ in items:
            if cur_b is None or a > cur_b:
                if cur_b is not None and cur_a is not None:
                    busy += cur_b - cur_a
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        if cur_a is not None and cur_b is not None:
            busy += cur_b - cur_a
        if total < self.min_bytes or busy < self.min_busy_s:
            return None
        return total / busy


@dataclass(frozen=True)
class Budget:
    """What is left of the current window, as admission sees it."""

    window: Contact | None
    seconds_left: float | None  # until the window's end (LOS)
    rate_bps: float | None  # the rate planned with
    rate_source: str  # "measured", "window", "uplink" or "unknown"
    chunk_bytes: int | None  # the largest chunk (with its manifest) that may begin; None: any
    manifest_bytes: int | None
    in_flight_bytes: int

    @property
    def total_bytes(self) -> int | None:
        """The whole window's remaining capacity, ignoring what is in flight."""
        if self.seconds_left is None or self.rate_bps is None:
            return None
        return int(self.seconds_left * self.rate_bps)


def _known_min(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def horizon_budget(windows: list[Contact], start: float, horizon_s: float,
                   measured_bps: float | None, uplink_bps: float | None,
                   safety: float = SAFETY) -> int | None:
    """Bytes the link is predicted to carry in [start, start + horizon_s): each window's part
    of it x the rate planned with (the measured throughput, else the window's own rate, within
    the window's and the uplink's caps), x `safety`. None when a window's rate is unknown."""
    end = start + horizon_s
    total = 0.0
    for w in windows:
        seconds = min(w.end, end) - max(w.start, start)
        if seconds <= 0:
            continue
        rate = _known_min(measured_bps, w.rate_bps, uplink_bps)
        if rate is None:
            return None
        total += seconds * rate * safety
    return int(total)


class Admission:
    """Hands out work that fits the window; thread-safe (claims run in the executor)."""

    def __init__(self, window_at: Callable[[float], Contact | None], clock: Clock, *,
                 post_pass_s: float = 0.0,
                 uplink_rate_bps: float | None = None, meter: RateMeter | None = None,
                 rtt: Callable[[], float | None] | None = None,
                 rate_at: Callable[[float], float | None] | None = None,
                 max_streams: int = 4, safety: float = SAFETY) -> None:
        self.window_at = window_at  # the gate's windows (they change on a config reload)
        self.clock = clock
        self.post_pass_s = post_pass_s
        self.uplink_rate_bps = uplink_rate_bps
        self.meter = meter or RateMeter()
        self.rtt = rtt or (lambda: None)
        self.rate_at = rate_at or self._window_rate
        self.max_streams = max_streams
        self.safety = safety
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._avg_chunk: float | None = None
        # hill climb state for streams_wanted
        self._extra = 0
        self._step = 1
        self._last_eval: tuple[int, float] | None = None  # (streams, rate) at the last step
        self._since_eval = 0

    # ---- rate and budget -------------------------------------------------------------------

    def _window_rate(self, t: float) -> float | None:
        w = self.window_at(t)
        return None if w is None else w.rate_bps

    def cap(self, now: float) -> float | None:
        """The token bucket's rate now: the window's (or timetable's) rate, within the cap."""
        return _known_min(self.rate_at(now), self.uplink_rate_bps)

    def planning_rate(self, now: float) -> tuple[float | None, str]:
        measured = self.meter.rate()
        caps = self.cap(now)
        if measured is not None:
            return _known_min(measured, caps), "measured"
        window = self.rate_at(now)
        if window is not None:
            return _known_min(window, self.uplink_rate_bps), "window"
        if self.uplink_rate_bps is not None:
            return self.uplink_rate_bps, "uplink"
        return None, "unknown"

    def budget(self, now: float | None = None) -> Budget:
        now = self.clock() if now is None else now
        window = self.window_at(now)
        in_flight = sum(self._in_flight.values())
        if window is None or math.isinf(window.end):
            return Budget(window, None, None, "unknown", None, None, in_flight)
        rate, source = self.planning_rate(now)
        left = window.end - now
        if rate is None:
            return Budget(window, left, None, source, None, None, in_flight)
        usable = rate * self.safety
        rtt = self.rtt() or 0.0
        chunk = int((left - self.post_pass_s - rtt) * usable) - in_flight
        manifest = int((left - rtt) * usable) - in_flight
        return Budget(window, left, rate, source, max(chunk, -1), max(manifest, -1), in_flight)

    # ---- admission -------------------------------------------------------------------------

    @staticmethod
    def _key(work: Work) -> str:
        return f"c:{work.chunk_id}" if isinstance(work, ChunkWork) else f"m:{work.object_id}"

    @staticmethod
    def cost(work: Work) -> int:
        if isinstance(work, ChunkWork):
            return work.sealed_size + work.manifest_bytes
        return work.manifest_bytes

    def claim(self, store: Store, now: float, aging_s: float,
              max_rank: int | None = None) -> tuple[Work | None, Budget]:
        """Claim the most urgent work that fits (blocking: call through the executor);
        `max_rank`: of classes ranked this or better only."""
        with self._lock:
            b = self.budget(now)
            if (b.chunk_bytes is not None and b.chunk_bytes < 0
                    and b.manifest_bytes is not None and b.manifest_bytes < 0):
                return None, b
            work = store.next_work(now, aging_s,
                                   None if b.chunk_bytes is None else max(0, b.chunk_bytes),
                                   None if b.manifest_bytes is None else max(0, b.manifest_bytes),
                                   max_rank=max_rank)
            if work is not None:
                self._in_flight[self._key(work)] = self.cost(work)
                if isinstance(work, ChunkWork):
                    size = float(work.sealed_size)
                    self._avg_chunk = size if self._avg_chunk is None else (
                        0.8 * self._avg_chunk + 0.2 * size)
            return work, b

    def finished(self, work: Work) -> None:
        """The work was acknowledged, cut or failed: its bytes no longer count as in flight."""
        with self._lock:
            self._in_flight.pop(self._key(work), None)

    def record_transfer(self, nbytes: int, started: float, finished: float) -> None:
        """A chunk was delivered (monotonic times from before rate limiting to the ack)."""
        self.meter.record(nbytes, started, finished)
        self._since_eval += 1

    # ---- parallel streams ------------------------------------------------------------------

    def bdp_streams(self, now: float | None = None) -> int:
        """Streams to cover the bandwidth-delay product: one on the wire, plus enough
        chunks in flight to keep sending while a stream is between two chunks."""
        rtt = self.rtt()
        rate, _ = self.planning_rate(self.clock() if now is None else now)
        if rtt is None or rate is None:
            return self.max_streams
        chunk = self._avg_chunk or DEFAULT_CHUNK
        # Between two chunks a stream idles for about PER_CHUNK_RTTS round trips: the answer
        # to its PUT, the next request's first bytes, and claiming and reading the next chunk
        # (the read-back runs beside the next chunk). Tolerated up to a tenth of a chunk.
        idle_s = PER_CHUNK_RTTS * rtt
        in_flight = max(0, math.ceil(idle_s * rate / chunk - 0.1))
        return max(1, min(self.max_streams, 1 + in_flight))

    def streams_wanted(self) -> int:
        """The BDP estimate, then one more or one fewer while the throughput says so."""
        base = self.bdp_streams()
        if self._since_eval >= 8:  # enough transfers since the last step to judge it
            self._since_eval = 0
            rate = self.meter.rate()
            current = max(1, min(self.max_streams, base + self._extra))
            if rate is not None:
                if self._last_eval is not None:
                    streams, before = self._last_eval
                    if streams != current and rate < before * 1.05:
                        self._step = -self._step  # the last step did not help: turn back
                self._extra = max(0, min(self.max_streams - base, self._extra + self._step))
                self._last_eval = (current, rate)
        return max(1, min(self.max_streams, base + self._extra))
