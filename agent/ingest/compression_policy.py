"""`[compression] level = "auto"`: the zstd level (and long-distance matching) chunks are sealed
with, chosen from the backlog and the link budget predicted for the next 24 hours.

The rule (`choose`, a pure function of a `Load` and the previous `Choice`):

1. **Pressure** = (sealed bytes queued for the link + bytes ready at the sources, not yet
   ingested) / (bytes the link is predicted to carry in the horizon: each window's part of the
   next 24 h x its planning rate, see `WindowRuntime.link_budget`).
2. **Fast, level 1**: pressure below 0.5, or no budget is known (no window rate, no uplink
   cap, nothing measured yet), or nothing to send: the link keeps up, so ingest is the
   bottleneck and every second spent compressing delays the data.
3. **Link-bound, level 19 with long-distance matching**: pressure of 1 or more: what is queued
   and waiting will not drain within the horizon, so bytes saved are hours of link saved, and
   sealing slower costs no delivery time as long as sealing still outruns the link. Hence the
   level is the highest rung (19+LDM, 16, 9, 1) whose output on `cpus` cores
   (`Rung.wire_rate`: per-core speed x cpus x ratio, measured on the benchmark corpus) still
   outruns the link's average rate over the horizon. Ingest busy-ness does not lower it:
   sealed sooner, data waiting at a source would only wait in the store instead. (Level 19
   costs ~90 MiB more memory per ingest thread than level 1: lower `TOP` on a small box.)
4. **In between, level 9** (pressure 0.5 to 1): worth a little CPU, not a slower ingest. If
   the ingest workers are saturated (busy 90 % or more: sources have data ready faster than it
   is sealed) it is **ingest-bound, level 1**.

Hysteresis, so the level does not flap: a regime is left only well below the threshold that
entered it (link-bound below 0.75, in-between below 0.35); climbing to a rung needs its output
to outrun the link 1.5 times, staying on it only once; and an ingest-bound site returns to
level 9 only when the busy-ness measured now, scaled by the relative cost of the two levels
(`Rung.seconds_per_mib`), predicts at most 50 % busy there, so a level is not taken up that
would saturate the workers again.

The rungs' speeds and ratios are constants measured by `python -m benchmarks.compression`
(its table in benchmarks/RESULTS.md); the rule only compares them, so rough is good enough.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

from agent.config.units import format_size

HORIZON_S = 24 * 3600.0
RETUNE_EVERY_S = 2.0  # how often the daemon chooses again
Regime = Literal["fast", "balanced", "link-bound", "ingest-bound"]

# Pressure thresholds: (enter, leave).
LINK_BOUND = (1.0, 0.75)
BALANCED = (0.5, 0.35)
OUTRUN_CLIMB = 1.5  # a rung's output must outrun the link this many times to climb to it...
OUTRUN_STAY = 1.0  # ...and this many times to stay on it
SATURATED = 0.9  # ingest busy-ness at which ingest is the bottleneck
RELAXED = 0.5  # the most busy-ness a climb may be predicted to cause


@dataclass(frozen=True)
class Rung:
    """One level the policy may choose, with what it costs and gives on the benchmark corpus
    (benchmarks/compression.py on 2 cores, the whole sealing path: chunking, hashing,
    compression, encryption, writing; the incompressible fifth skips compression)."""

    level: int
    long_distance: bool
    mib_s: float  # plaintext MiB sealed per CPU second
    ratio: float  # sealed / plaintext

    def wire_rate(self, cpus: int) -> float:
        """Sealed bytes per second `cpus` cores produce at this level: what the link must beat
        for compression not to idle it."""
        return cpus * self.mib_s * (1 << 20) * self.ratio

    @property
    def seconds_per_mib(self) -> float:
        """CPU seconds to seal one MiB."""
        return 1 / self.mib_s

    def describe(self) -> str:
        return f"{self.level}{' with long-distance matching' if self.long_distance else ''}"


FAST = Rung(1, False, 170.0, 0.426)
MID = Rung(9, False, 46.0, 0.420)
HIGH = Rung(16, False, 6.5, 0.384)
TOP = Rung(19, True, 2.8, 0.369)  # ~+90 MiB RSS per ingest thread over level 1
RUNGS = (FAST, MID, HIGH, TOP)


@dataclass(frozen=True)
class Load:
    """What the policy decides from."""

    queued_bytes: int  # sealed bytes in the store, waiting for the link
    budget_bytes: int | None  # what the link can carry within the horizon; None: unknown
    waiting_bytes: int = 0  # ready at the sources, not yet ingested (plaintext)
    ingest_busy: float = 0.0  # share of the ingest workers' capacity in use lately (0 to 1)
    cpus: int = 1
    horizon_s: float = HORIZON_S

    @property
    def backlog_bytes(self) -> int:
        return self.queued_bytes + self.waiting_bytes

    @property
    def pressure(self) -> float | None:
        """Backlog over budget; None when no budget is known."""
        if self.budget_bytes is None:
            return None
        if self.backlog_bytes == 0:
            return 0.0
        return math.inf if self.budget_bytes <= 0 else self.backlog_bytes / self.budget_bytes

    @property
    def link_rate(self) -> float:
        """The link's average rate over the horizon, bytes/s (0 when unknown)."""
        return (self.budget_bytes or 0) / self.horizon_s


@dataclass(frozen=True)
class Choice:
    level: int
    long_distance: bool
    regime: Regime
    reason: str

    @property
    def setting(self) -> tuple[int, bool]:
        return self.level, self.long_distance


INITIAL = Choice(FAST.level, FAST.long_distance, "fast", "starting fast until the first look "
                 "at the backlog and the link budget")


def _rung(level: int) -> Rung:
    """The rung a level was measured at (levels off the ladder: the nearest one below)."""
    return max((r for r in RUNGS if r.level <= level), key=lambda r: r.level, default=FAST)


def _regime(pressure: float, previous: Regime) -> Regime:
    was_link = previous == "link-bound"
    was_busy = previous in ("balanced", "ingest-bound", "link-bound")
    if pressure >= LINK_BOUND[1 if was_link else 0]:
        return "link-bound"
    if pressure >= BALANCED[1 if was_busy else 0]:
        return "balanced"
    return "fast"


def predicted_busy(busy: float, now: Rung, then: Rung) -> float:
    """Ingest busy-ness at `then`, from what was measured at `now` (same arrivals)."""
    return busy * then.seconds_per_mib / now.seconds_per_mib


def _outrunning(top: Rung, load: Load, current: Rung) -> Rung:
    """The highest rung up to `top` whose output outruns the link on load.cpus cores."""
    for rung in sorted((r for r in RUNGS if r.level <= top.level), key=lambda r: -r.level):
        need = OUTRUN_STAY if rung.level <= current.level else OUTRUN_CLIMB
        if rung.wire_rate(load.cpus) >= need * load.link_rate:
            return rung
    return FAST


def choose(load: Load, previous: Choice | None = None) -> Choice:
    """The level to seal with now (see the module docstring for the rule)."""
    prev = previous or INITIAL
    current = _rung(prev.level)
    pressure = load.pressure
    to_send = format_size(load.backlog_bytes)
    if pressure is None:
        return Choice(FAST.level, False, "fast", "link budget unknown (no window or uplink "
                      "rate, nothing measured yet): level 1")
    budget = format_size(load.budget_bytes or 0)
    hours = load.horizon_s / 3600
    regime = _regime(pressure, prev.regime)
    if regime == "fast":
        return Choice(FAST.level, False, "fast", f"the link keeps up ({to_send} to send, "
                      f"{budget} can go in the next {hours:g} h): level 1")
    busy = load.ingest_busy
    if regime == "balanced":
        stays = current.level >= MID.level and busy < SATURATED
        if not stays and predicted_busy(busy, current, MID) > RELAXED:
            return Choice(FAST.level, False, "ingest-bound", f"ingest is the bottleneck "
                          f"(workers {busy:.0%} busy, {to_send} to send, {budget} can go in "
                          f"the next {hours:g} h): level 1")
        rung = _outrunning(MID, load, current)
        return Choice(rung.level, rung.long_distance, "balanced", f"the link is filling "
                      f"({to_send} to send, {budget} can go in the next {hours:g} h): level "
                      f"{rung.describe()}")
    rung = _outrunning(TOP, load, current)
    why = f"link-bound ({to_send} to send, {budget} can go in the next {hours:g} h)"
    if rung is not TOP:
        why += (f"; {load.cpus} CPU(s) at {TOP.level} would not outrun the link's "
                f"{format_size(int(load.link_rate))}/s")
    return Choice(rung.level, rung.long_distance, "link-bound",
                  f"{why}: level {rung.describe()}")


# ---- the daemon side: measuring busy-ness, applying the choice ---------------------------------


class IngestLoad:
    """How busy the ingest workers are: the mean number of objects being sealed at once, as a
    share of `capacity`, exponentially weighted over about `tau_s` seconds. Thread-safe."""

    def __init__(self, capacity: int, tau_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = max(1, capacity)
        self.tau_s = tau_s
        self.clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = self._last = clock()
        self._area = 0.0  # object-seconds since the last sample
        self._busy = 0.0

    def _advance(self, now: float) -> None:
        self._area += self._in_flight * max(0.0, now - self._last)
        self._last = now

    @contextmanager
    def sealing(self) -> Iterator[None]:
        """Around one ingest call (a file, a pack or a batch)."""
        with self._lock:
            self._advance(self.clock())
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._advance(self.clock())
                self._in_flight -= 1

    def busy(self) -> float:
        """The weighted busy-ness now, 0 to 1."""
        with self._lock:
            now = self.clock()
            self._advance(now)
            span = now - self._since
            if span > 0:
                sample = min(1.0, self._area / span / self.capacity)
                self._busy += (1 - math.exp(-span / self.tau_s)) * (sample - self._busy)
                self._since, self._area = now, 0.0
            return self._busy


class LevelSink(Protocol):
    def set_level(self, level: int, long_distance: bool = False) -> None: ...


class AutoLevel:
    """Keeps a compressor at the level `choose` picks; the caller gathers the load."""

    def __init__(self, compressor: LevelSink, cpus: int, capacity: int | None = None,
                 horizon_s: float = HORIZON_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.compressor = compressor
        self.cpus = max(1, cpus)
        self.horizon_s = horizon_s
        self.ingest = IngestLoad(capacity or self.cpus, clock=clock)
        self.choice = INITIAL
        compressor.set_level(INITIAL.level, INITIAL.long_distance)

    def update(self, queued_bytes: int, waiting_bytes: int, budget_bytes: int | None) -> bool:
        """Decide again; True when the level changed (and was applied)."""
        load = Load(queued_bytes, budget_bytes, waiting_bytes, self.ingest.busy(), self.cpus,
                    self.horizon_s)
        new = choose(load, self.choice)
        changed = new.setting != self.choice.setting
        self.choice = new
        if changed:
            self.compressor.set_level(new.level, new.long_distance)
        return changed
