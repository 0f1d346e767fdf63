"""Issue 4, acceptance 4: learned availability. Fed a synthetic week of link history with a
daily pattern, the forecast for the next day finds >= 90% of the up-time with >= 90% precision;
the model persists in the store; forecasts are scored (the hit-rate metric)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

from agent.config.settings import ClassSettings, LinkSettings
from agent.obs.metrics import Metrics
from agent.store.store import Store
from agent.windows import Contact
from agent.windows.learned import META_KEY, LearnedModel
from agent.windows.linkmonitor import LinkMonitor

DAY = 86400.0
MON = datetime(2026, 11, 2, tzinfo=UTC).timestamp()  # a Monday


def day_of_link(rng: random.Random, day0: float) -> list[tuple[float, float]]:
    """One day of an always-on but flaky link: up 05:00-09:30 and 13:00-22:15 UTC (edges
    jittered by up to 5 minutes), each stretch broken by short random outages."""
    ups = []
    for a, b in ((5 * 3600, 9.5 * 3600), (13 * 3600, 22.25 * 3600)):
        a += rng.uniform(-300, 300)
        b += rng.uniform(-300, 300)
        t = a
        while t < b:
            length = rng.uniform(60, 1800)
            ups.append((day0 + t, day0 + min(b, t + length)))
            t += length + (rng.expovariate(1 / 90) if rng.random() < 0.5 else 0.0)
    return ups


def feed_day(model: LearnedModel, ups: list[tuple[float, float]], day0: float,
             rate: float = 2e6, step: float = 30.0) -> None:
    """What a link monitor probing every `step` seconds would tell the model."""
    t = day0
    while t < day0 + DAY:
        up = any(a <= t < b for a, b in ups)
        model.observe(t, t + step, up, rate if up else None)
        t += step


def overlap(ups: list[tuple[float, float]], windows: list[Contact]) -> float:
    return sum(max(0.0, min(b, w.end) - max(a, w.start)) for a, b in ups for w in windows)


def test_a_week_of_history_forecasts_the_next_day() -> None:
    rng = random.Random(7)
    model = LearnedModel()
    for d in range(7):
        feed_day(model, day_of_link(rng, MON + d * DAY), MON + d * DAY)
    tomorrow = MON + 7 * DAY
    actual = day_of_link(random.Random(1234), tomorrow)
    forecast = model.forecast(tomorrow, tomorrow + DAY)
    up_time = sum(b - a for a, b in actual)
    predicted = sum(w.duration_s for w in forecast)
    hit = overlap(actual, forecast)
    recall, precision = hit / up_time, hit / predicted
    print(f"learned forecast: recall {recall:.3f}, precision {precision:.3f}, "
          f"{len(forecast)} windows")
    assert recall >= 0.9
    assert precision >= 0.9
    assert all(w.source == "learned" and w.rate_bps == 2e6 for w in forecast)
    # Scored as it learned: from day 2 on every observation was checked against the forecast.
    assert model.hits.precision is not None and model.hits.precision >= 0.9
    assert model.hits.recall is not None and model.hits.recall >= 0.9


def test_the_model_persists_in_the_store(tmp_path: Path) -> None:
    model = LearnedModel()
    rng = random.Random(3)
    for d in range(7):
        feed_day(model, day_of_link(rng, MON + d * DAY), MON + d * DAY, step=60)
    store = Store(tmp_path / "state", [ClassSettings("normal", 0, "evict-oldest")])
    try:
        store.set_meta(META_KEY, model.to_json())
    finally:
        store.close()
    ro = Store(tmp_path / "state", [ClassSettings("normal", 0, "evict-oldest")], read_only=True)
    try:
        again = LearnedModel.from_json(ro.get_meta(META_KEY))
    finally:
        ro.close()
    tomorrow = MON + 7 * DAY
    a, b = model.forecast(tomorrow, tomorrow + DAY), again.forecast(tomorrow, tomorrow + DAY)
    assert [(w.start, w.end) for w in a] == [(w.start, w.end) for w in b]
    assert again.hits.precision is not None
    assert abs(again.hits.precision - (model.hits.precision or 0)) < 1e-9
    assert LearnedModel.from_json("{not json").observed_s == 0  # damaged: relearned, not fatal


def test_a_changed_routine_takes_over_within_two_weeks() -> None:
    model = LearnedModel()
    for d in range(14):  # two weeks up in the morning ...
        feed_day(model, [(MON + d * DAY + 6 * 3600, MON + d * DAY + 10 * 3600)],
                 MON + d * DAY, step=120)
    for d in range(14, 28):  # ... then two weeks up in the evening
        feed_day(model, [(MON + d * DAY + 18 * 3600, MON + d * DAY + 22 * 3600)],
                 MON + d * DAY, step=120)
    day = MON + 28 * DAY
    (w,) = model.forecast(day, day + DAY)
    assert (w.start - day, w.end - day) == (18 * 3600, 22 * 3600)


class _Probe:
    description = "test probe"

    def __init__(self) -> None:
        self.ok = True

    async def __call__(self, timeout_s: float) -> None:
        if not self.ok:
            raise OSError("unreachable")


async def test_probes_feed_the_model_and_the_hit_rate_gauge() -> None:
    clock_now = [MON]
    metrics = Metrics()
    model = LearnedModel()
    probe = _Probe()
    mon = LinkMonitor(probe, LinkSettings(interval_s=60, timeout_s=1), lambda: clock_now[0],
                      model=model, metrics=metrics)
    for d in range(8):  # up 08:00-16:00 every day, one probe a minute
        for minute in range(1440):
            clock_now[0] = MON + d * DAY + minute * 60
            probe.ok = 8 * 60 <= minute < 16 * 60
            await mon.probe_once()
    value = metrics.registry.get_sample_value("skyferry_forecast_hit_ratio")
    assert value is not None and value > 0.95
    assert model.hits.accuracy is not None and model.hits.accuracy > 0.95
    assert [(c.start - MON - 8 * DAY, c.end - MON - 8 * DAY)
            for c in model.forecast(MON + 8 * DAY, MON + 9 * DAY)] == [(8 * 3600, 16 * 3600)]
