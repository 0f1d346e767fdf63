"""Learned availability: when an always-on but flaky link tends to be up, by time of week.

Orbital elements cannot predict a Starlink-class link (the serving satellite changes every
~15 s; obstructions, weather and outages do the rest), but its history can: a dish with a tree
to the north loses the link at the same minutes every day, a site on a generator is dark at
night. The model keeps, for each 10-minute bin of the week, how long the link was observed and
how long it was up (and at what rate), with older weeks weighing less. A bin's probability of
being up blends its own history with the same time of day on the other days of the week: one
week of history then already gives seven samples per time of day, and a weekly rhythm still
shows through.

Every observation is first scored against what the model would have forecast for it, before
it is learned: that running score (accuracy, precision, recall) is the hit-rate metric.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from agent.windows import Contact

BIN_S = 600
DAY_BINS = 86400 // BIN_S
WEEK_BINS = 7 * DAY_BINS
_MONDAY0 = 4 * 86400  # 1970-01-01 was a Thursday
DECAY_PER_WEEK = 0.7  # a changed routine takes over within about two weeks
MIN_SEEN_S = 60.0  # a bin observed for less than this has no opinion of its own
UP_THRESHOLD = 0.5
HIT_TIME_CONSTANT_S = 7 * 86400.0  # the hit rate describes roughly the last week
FORMAT = 1


def week_bin(t: float) -> tuple[int, int]:
    """(week number, bin within the week) of Unix time t."""
    k = math.floor((t - _MONDAY0) / BIN_S)
    return k // WEEK_BINS, k % WEEK_BINS


@dataclass
class HitRate:
    """Time-weighted agreement between forecast and what happened, decaying with age."""

    agree_s: float = 0.0
    total_s: float = 0.0
    predicted_up_s: float = 0.0  # forecast up
    true_up_s: float = 0.0  # forecast up and was up
    actual_up_s: float = 0.0  # was up
    stamp: float | None = None

    def add(self, t: float, seconds: float, predicted: bool, actual: bool) -> None:
        if self.stamp is not None and t > self.stamp:
            f = math.exp(-(t - self.stamp) / HIT_TIME_CONSTANT_S)
            self.agree_s *= f
            self.total_s *= f
            self.predicted_up_s *= f
            self.true_up_s *= f
            self.actual_up_s *= f
        self.stamp = t if self.stamp is None else max(self.stamp, t)
        self.total_s += seconds
        self.agree_s += seconds if predicted == actual else 0.0
        self.predicted_up_s += seconds if predicted else 0.0
        self.actual_up_s += seconds if actual else 0.0
        self.true_up_s += seconds if predicted and actual else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.agree_s / self.total_s if self.total_s > 0 else None

    @property
    def precision(self) -> float | None:
        return self.true_up_s / self.predicted_up_s if self.predicted_up_s > 0 else None

    @property
    def recall(self) -> float | None:
        return self.true_up_s / self.actual_up_s if self.actual_up_s > 0 else None


class LearnedModel:
    """Per time-of-week link history; observe() what happened, forecast() what will."""

    def __init__(self) -> None:
        self.up = [0.0] * WEEK_BINS
        self.seen = [0.0] * WEEK_BINS
        self.rate_sum = [0.0] * WEEK_BINS  # rate x seconds while up and measured
        self.rate_w = [0.0] * WEEK_BINS
        self.week = [-1] * WEEK_BINS  # the week each bin was last updated in
        self.hits = HitRate()
        self.observed_s = 0.0

    # ---- learning -----------------------------------------------------------------------

    def observe(self, start: float, end: float, up: bool, rate_bps: float | None = None) -> None:
        """The link was `up` (or not) over [start, end), at `rate_bps` if measured."""
        t = start
        while t < end:
            week, b = week_bin(t)
            bin_end = (week * WEEK_BINS + b + 1) * BIN_S + _MONDAY0
            piece = min(end, bin_end) - t
            p = self.probability_bin(b)
            if p is not None:
                self.hits.add(t, piece, p >= UP_THRESHOLD, up)
            self._age(b, week)
            self.seen[b] += piece
            if up:
                self.up[b] += piece
                if rate_bps is not None and rate_bps > 0:
                    self.rate_sum[b] += rate_bps * piece
                    self.rate_w[b] += piece
            self.observed_s += piece
            t += piece

    def _age(self, b: int, week: int) -> None:
        last = self.week[b]
        if last >= 0 and week > last:
            f = DECAY_PER_WEEK ** (week - last)
            self.up[b] *= f
            self.seen[b] *= f
            self.rate_sum[b] *= f
            self.rate_w[b] *= f
        self.week[b] = max(last, week)

    # ---- forecasting --------------------------------------------------------------------

    def _same_time_of_day(self, b: int) -> range:
        return range(b % DAY_BINS, WEEK_BINS, DAY_BINS)

    def probability_bin(self, b: int) -> float | None:
        """Chance the link is up in week bin b; None when there is no history for it."""
        own = self.up[b] / self.seen[b] if self.seen[b] >= MIN_SEEN_S else None
        seen = sum(self.seen[i] for i in self._same_time_of_day(b))
        daily = (sum(self.up[i] for i in self._same_time_of_day(b)) / seen
                 if seen >= MIN_SEEN_S else None)
        if own is None:
            return daily
        if daily is None:
            return own
        return 0.5 * own + 0.5 * daily

    def probability(self, t: float) -> float | None:
        return self.probability_bin(week_bin(t)[1])

    def rate_bin(self, b: int) -> float | None:
        w = self.rate_w[b]
        if w >= MIN_SEEN_S:
            return self.rate_sum[b] / w
        same = self._same_time_of_day(b)
        w = sum(self.rate_w[i] for i in same)
        return sum(self.rate_sum[i] for i in same) / w if w > 0 else None

    def forecast(self, start: float, end: float, min_len_s: float = 0.0) -> list[Contact]:
        """Windows in [start, end) where the link is more likely up than not."""
        out: list[Contact] = []
        t = start
        run_start: float | None = None
        bytes_ = rated_s = 0.0
        while t < end:
            week, b = week_bin(t)
            bin_end = min(end, (week * WEEK_BINS + b + 1) * BIN_S + _MONDAY0)
            p = self.probability_bin(b)
            if p is not None and p >= UP_THRESHOLD:
                if run_start is None:
                    run_start, bytes_, rated_s = t, 0.0, 0.0
                rate = self.rate_bin(b)
                if rate is not None:
                    bytes_ += rate * (bin_end - t)
                    rated_s += bin_end - t
            elif run_start is not None:
                out.append(self._window(run_start, t, bytes_, rated_s))
                run_start = None
            t = bin_end
        if run_start is not None:
            out.append(self._window(run_start, end, bytes_, rated_s))
        return [c for c in out if c.duration_s >= min_len_s]

    @staticmethod
    def _window(start: float, end: float, bytes_: float, rated_s: float) -> Contact:
        return Contact(start, end, bytes_ / rated_s if rated_s > 0 else None, "learned")

    # ---- persistence --------------------------------------------------------------------

    def to_json(self) -> str:
        h = self.hits
        return json.dumps({
            "format": FORMAT, "bin_s": BIN_S,
            "up": [round(x, 1) for x in self.up], "seen": [round(x, 1) for x in self.seen],
            "rate_sum": [round(x) for x in self.rate_sum],
            "rate_w": [round(x, 1) for x in self.rate_w], "week": self.week,
            "hits": [h.agree_s, h.total_s, h.predicted_up_s, h.true_up_s, h.actual_up_s, h.stamp],
            "observed_s": self.observed_s,
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> LearnedModel:
        """The stored model; a fresh one when there is none or it is of another format."""
        model = cls()
        if not text:
            return model
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("format") != FORMAT or data.get("bin_s") != BIN_S:
                return model
            arrays = [data[k] for k in ("up", "seen", "rate_sum", "rate_w", "week")]
            if any(len(a) != WEEK_BINS for a in arrays):
                return model
            model.up, model.seen = [float(x) for x in arrays[0]], [float(x) for x in arrays[1]]
            model.rate_sum = [float(x) for x in arrays[2]]
            model.rate_w = [float(x) for x in arrays[3]]
            model.week = [int(x) for x in arrays[4]]
            a, t, pu, tu, au, stamp = data["hits"]
            model.hits = HitRate(float(a), float(t), float(pu), float(tu), float(au),
                                 None if stamp is None else float(stamp))
            model.observed_s = float(data.get("observed_s", 0.0))
        except (ValueError, KeyError, TypeError):
            return cls()  # a damaged model is relearned, never fatal
        return model


META_KEY = "learned_availability"
