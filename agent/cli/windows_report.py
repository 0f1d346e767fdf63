"""`skyferry windows` and the window lines of `skyferry status`: from config and store only.

No daemon is needed: the forecast is rebuilt from the config (element and timetable files are
read, passes predicted), the learned link model and the cycle anchor come from the store's meta
table (read-only; a site that never ran has neither), and so does the queue the planned drain
is drawn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config.settings import Settings
from agent.config.units import format_duration, format_size
from agent.store.store import Store
from agent.windows import Contact
from agent.windows.forecast import Forecast, build_forecast, describe, plan_drain
from agent.windows.learned import META_KEY, LearnedModel, week_bin


@dataclass
class Context:
    forecast: Forecast
    queue: list[tuple[str, int]]  # (class, queued bytes) in the order classes are served
    uplink_rate: float | None


def load_context(settings: Settings, now: float) -> Context:
    anchor = now
    model: LearnedModel | None = None
    queue: list[tuple[str, int]] = []
    index = Path(settings.site.state_dir) / "index.sqlite"
    if index.exists():
        store = Store(settings.site.state_dir, settings.classes, read_only=True)
        try:
            anchor = float(store.get_meta("cycle_anchor") or now)
            if settings.windows.link.learn:
                model = LearnedModel.from_json(store.get_meta(META_KEY))
            summary = store.summary(now)
        finally:
            store.close()
        for c in sorted(settings.classes, key=lambda c: c.rank):
            s = summary.get(c.name)
            if s is not None:
                queue.append((c.name, s.bytes.get("queued", 0)))
    forecast = build_forecast(settings.windows, anchor, model, now=now)  # passes predicted
    return Context(forecast, queue, settings.uplink.rate_bps)


def fallback_rate(ctx: Context, c: Contact) -> float | None:
    """A window's rate when it states none: what the link learned for that time, else the
    uplink cap."""
    model = ctx.forecast.learned
    if model is not None and not math.isinf(c.end):
        learned = model.rate_bin(week_bin((c.start + c.end) / 2)[1])
        if learned is not None:
            return learned
    return ctx.uplink_rate


def windows_data(settings: Settings, now: float, hours: float) -> list[dict[str, Any]]:
    """The coming windows, as `skyferry windows --json` prints them."""
    ctx = load_context(settings, now)
    return _rows(ctx, ctx.forecast.upcoming(now, now + hours * 3600))


def _rows(ctx: Context, windows: list[Contact]) -> list[dict[str, Any]]:
    rates = [fallback_rate(ctx, w) for w in windows]
    plans = _plans(ctx, windows, rates)
    out = []
    for w, rate, plan in zip(windows, rates, plans, strict=True):
        row = describe(w, rate)
        row["planned_bytes"] = dict(plan)
        out.append(row)
    return out


def _plans(ctx: Context, windows: list[Contact],
           rates: list[float | None]) -> list[list[tuple[str, int]]]:
    # Each window at its own (possibly fallback) rate: plan one at a time, carrying the rest.
    queue = list(ctx.queue)
    plans = []
    for w, rate in zip(windows, rates, strict=True):
        plan = plan_drain([w], queue, rate)[0]
        sent = dict(plan)
        queue = [(n, b - sent.get(n, 0)) for n, b in queue]
        plans.append(plan)
    return plans


def print_windows(settings: Settings, now: float, hours: float, svg: Path | None,
                  quiet: bool = False) -> int:
    """The table (unless `quiet`), and the SVG timeline when asked for."""
    ctx = load_context(settings, now)
    windows = ctx.forecast.upcoming(now, now + hours * 3600)
    rows = _rows(ctx, windows)
    if not quiet:
        _print_table(ctx, settings, now, hours, windows, rows)
    if svg is not None:
        from agent.cli.windows_svg import render_timeline

        plans = [list(row["planned_bytes"].items()) for row in rows]
        svg.write_text(render_timeline(windows, plans, now, now + hours * 3600,
                                       [name for name, _ in ctx.queue], dict(ctx.queue)))
        if not quiet:
            print(f"timeline written to {svg}")
    return 0


def _print_table(ctx: Context, settings: Settings, now: float, hours: float,
                 windows: list[Contact], rows: list[dict[str, Any]]) -> None:
    for warning in ctx.forecast.warnings(now):
        print(f"warning: {warning}")
    print(f"windows in the next {hours:g} h (UTC), mode {settings.windows.mode}")
    print(f"{'start':<20} {'end':<20} {'duration':>9} {'max el':>7} {'source':<10} "
          f"{'expected':>10}")
    for w, row in zip(windows, rows, strict=True):
        end = "(open-ended)" if math.isinf(w.end) else _short(w.end)
        dur = "" if math.isinf(w.end) else format_duration(round(w.duration_s))
        el = "" if w.max_elevation_deg is None else f"{w.max_elevation_deg:.0f}°"
        expected = row["expected_bytes"]
        shown = "?" if expected is None else format_size(expected)
        print(f"{_short(w.start):<20} {end:<20} {dur:>9} {el:>7} {w.source:<10} {shown:>10}"
              + (f"  {w.detail}" if w.detail else ""))
    if not windows:
        print("(no window)")
    model = ctx.forecast.learned
    if model is not None and model.hits.total_s > 0:
        h = model.hits
        print(f"learned link model: forecast hit rate {_pct(h.precision)} of predicted up-time "
              f"confirmed, {_pct(h.recall)} of up-time foreseen")


def _short(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def window_status(ctx: Context, now: float) -> dict[str, Any]:
    """The current and the next window, for `skyferry status`."""
    f = ctx.forecast
    current = f.window_at(now) if not f.schedule.always else None
    nxt: Contact | None = None
    if f.schedule.always:
        learned = f.upcoming(now, now + 2 * 86400)
        current = next((c for c in learned if c.start <= now < c.end), None)
        nxt = next((c for c in learned if c.start > now), None)
    else:
        start = f.next_window_start(now) if current is None else current.end
        if start is not None and not math.isinf(start):
            nxt = next((c for c in f.upcoming(start, start + 8 * 86400) if c.start >= start),
                       None)
    return {
        "current_window": None if current is None else describe(current,
                                                                fallback_rate(ctx, current)),
        "next_window": None if nxt is None else describe(nxt, fallback_rate(ctx, nxt)),
    }


def status_lines(data: dict[str, Any]) -> list[str]:
    out = []
    for label, key in (("current window", "current_window"), ("next window", "next_window")):
        w = data.get(key)
        if w is None:
            out.append(f"{label}: none")
            continue
        end = w["end"] or "open-ended"
        extra = [w["source"]]
        if w["max_elevation_deg"] is not None:
            extra.append(f"max elevation {w['max_elevation_deg']:.0f}°")
        if w["expected_bytes"] is not None:
            extra.append(f"~{format_size(w['expected_bytes'])}")
        out.append(f"{label}: {w['start']} - {end} ({', '.join(extra)})")
    return out

