"""`skyferry windows --svg FILE`: a timeline of the windows and the planned drain of the queue.

Top lane: each window as a bar on the time axis (labelled with its source and, for passes, the
highest elevation). Below, one lane per priority class: the bytes of that class each window is
expected to carry, as a bar whose height is the share of the window's expected bytes, with the
amount written on it. A last line says what would still be queued at the end. Plain SVG, no
scripts, no external resources, so it opens anywhere (and can be mailed from a site).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from xml.sax.saxutils import escape

from agent.config.units import format_size
from agent.windows import Contact

WIDTH = 1000
LEFT = 90
RIGHT = 20
LANE = 34
PALETTE = ("#d7263d", "#f46036", "#2e86ab", "#1b998b", "#8e6c8a", "#c5d86d", "#6c757d")


def _x(t: float, start: float, end: float) -> float:
    span = max(end - start, 1.0)
    return LEFT + (min(max(t, start), end) - start) / span * (WIDTH - LEFT - RIGHT)


def render_timeline(windows: Sequence[Contact], plans: Sequence[Sequence[tuple[str, int]]],
                    start: float, end: float, classes: Sequence[str],
                    queued: dict[str, int]) -> str:
    height = 70 + LANE * (1 + len(classes)) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
           f'<text x="{LEFT}" y="18" font-size="14">skyferry windows '
           f'{escape(_stamp(start))} to {escape(_stamp(end))} UTC</text>']
    # hour ticks
    hours = (end - start) / 3600
    every = 1 if hours <= 12 else 3 if hours <= 48 else 12
    tick = math.ceil(start / (every * 3600)) * every * 3600
    axis_y = 40
    while tick <= end:
        x = _x(tick, start, end)
        out.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{height - 30}" '
                   'stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y - 4}" text-anchor="middle">'
                   f'{datetime.fromtimestamp(tick, UTC):%H:%M}</text>')
        tick += every * 3600
    # window lane
    y = axis_y + 10
    out.append(f'<text x="8" y="{y + 20}">windows</text>')
    for w in windows:
        x0, x1 = _x(w.start, start, end), _x(w.end, start, end)
        label = w.source + ("" if w.max_elevation_deg is None else
                            f" {w.max_elevation_deg:.0f}°")
        title = (f"{_stamp(w.start)} - {'open-ended' if math.isinf(w.end) else _stamp(w.end)}"
                 f" {label}" + (f" ({w.detail})" if w.detail else ""))
        out.append(f'<rect x="{x0:.1f}" y="{y + 4}" width="{max(x1 - x0, 1.5):.1f}" '
                   f'height="{LANE - 8}" fill="#4a90d9"><title>{escape(title)}</title></rect>')
        if x1 - x0 > 40:
            out.append(f'<text x="{x0 + 3:.1f}" y="{y + 21}" fill="white">'
                       f'{escape(label)}</text>')
    out += _class_lanes(windows, plans, start, end, classes, axis_y)
    left = {n: queued.get(n, 0) - sum(dict(p).get(n, 0) for p in plans) for n in classes}
    rest = ", ".join(f"{n} {format_size(max(0, b))}" for n, b in left.items() if b > 0)
    out.append(f'<text x="{LEFT}" y="{height - 10}">still queued after these windows: '
               f'{escape(rest or "nothing")}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _class_lanes(windows: Sequence[Contact], plans: Sequence[Sequence[tuple[str, int]]],
                 start: float, end: float, classes: Sequence[str], axis_y: int) -> list[str]:
    """One lane per class: the bytes of that class each window is planned to carry."""
    out: list[str] = []
    for i, name in enumerate(classes):
        y = axis_y + 10 + LANE * (i + 1)
        colour = PALETTE[i % len(PALETTE)]
        out.append(f'<text x="8" y="{y + 20}">{escape(name)}</text>')
        out.append(f'<line x1="{LEFT}" y1="{y + LANE - 4}" x2="{WIDTH - RIGHT}" '
                   f'y2="{y + LANE - 4}" stroke="#cccccc"/>')
        for w, plan in zip(windows, plans, strict=True):
            sent = dict(plan).get(name, 0)
            if sent <= 0:
                continue
            total = sum(b for _, b in plan) or 1
            h = max(3.0, (LANE - 8) * sent / total)
            x0, x1 = _x(w.start, start, end), _x(w.end, start, end)
            out.append(f'<rect x="{x0:.1f}" y="{y + LANE - 4 - h:.1f}" '
                       f'width="{max(x1 - x0, 1.5):.1f}" height="{h:.1f}" fill="{colour}">'
                       f'<title>{escape(name)}: {escape(format_size(sent))}</title></rect>')
            if x1 - x0 > 50:
                out.append(f'<text x="{x0 + 2:.1f}" y="{y + 12}">'
                           f'{escape(format_size(sent))}</text>')
    return out


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")
