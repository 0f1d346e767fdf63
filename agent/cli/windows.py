"""`skyferry windows`: the coming contact windows, from config and store (no daemon needed)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.common import add_config_argument, load_settings
from agent.config.units import format_duration, format_size

if TYPE_CHECKING:  # the forecast (and skyfield) is imported only when this verb runs
    from agent.cli.windows_report import Context
    from agent.config.settings import Settings
    from agent.windows import Contact

NAME = "windows"
HELP = "the coming contact windows (no daemon needed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--hours", type=float, default=24.0, help="how far ahead (default 24)")
    p.add_argument("--json", action="store_true",
                   help="a JSON array of windows, UTC ISO-8601 times")
    p.add_argument("--svg", type=Path, metavar="FILE",
                   help="also draw the windows and the planned drain of the queue per class")


def main(args: argparse.Namespace) -> int:
    from agent.cli.windows_report import windows_data

    settings = load_settings(args)
    if args.hours <= 0:
        print("skyferry windows: error: --hours must be greater than 0", file=sys.stderr)
        return 2
    now = time.time()
    if args.json:
        print(json.dumps(windows_data(settings, now, args.hours), indent=2))
        if args.svg is None:
            return 0
    return print_windows(settings, now, args.hours, args.svg, quiet=args.json)


def print_windows(settings: Settings, now: float, hours: float, svg: Path | None,
                  quiet: bool = False) -> int:
    """The table (unless `quiet`), and the SVG timeline when asked for."""
    from agent.cli.windows_report import load_context, window_rows

    ctx = load_context(settings, now)
    windows = ctx.forecast.upcoming(now, now + hours * 3600)
    rows = window_rows(ctx, windows)
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
