"""`skyferry status`: queue by class and state from the store, the gate from the configured
windows, and what the daemon says about itself when it answers on its socket."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.cli.common import add_config_argument, load_settings
from agent.errors import SkyferryError

if TYPE_CHECKING:
    from agent.config.settings import Settings

NAME = "status"
HELP = "queue by class and state, and the gate"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def status_data(settings: Settings, now: float) -> dict[str, Any]:
    """Queue by class and state and the gate, from the store and the configured windows."""
    from agent.cli.windows_report import load_context, window_status
    from agent.store.store import Store

    store = Store(settings.site.state_dir, settings.classes, read_only=True)
    try:
        summary = store.summary(now)
        chunks = store.chunk_counts()
    finally:
        store.close()
    ctx = load_context(settings, now)  # every window source: schedule, timetable, passes
    schedule = ctx.forecast.schedule
    window = schedule.window_at(now)
    nxt = schedule.next_change(now)
    classes = {
        name: {"items": s.items, "bytes": s.bytes, "oldest_queued_age_s": s.oldest_queued_age_s}
        for name, s in summary.items()
    }
    return {
        "site": settings.site.id,
        "time": datetime.fromtimestamp(now, UTC).isoformat(),
        "classes": classes,
        "chunks": {state: {"items": n, "bytes": b} for state, (n, b) in chunks.items()},
        "queued_objects": sum(s.items.get("queued", 0) for s in summary.values()),
        "queued_bytes": sum(s.bytes.get("queued", 0) for s in summary.values()),
        "gate": {
            "mode": settings.windows.mode,
            "window_open": window is not None,
            "window_end": None if window is None or window.end == float("inf") else
            datetime.fromtimestamp(window.end, UTC).isoformat(),
            "next_change": None if nxt is None else datetime.fromtimestamp(nxt, UTC).isoformat(),
            **window_status(ctx, now),
        },
    }


def main(args: argparse.Namespace) -> int:
    from agent.cli.status_view import daemon_lines, with_daemon
    from agent.sources.put_client import request_status

    settings = load_settings(args)
    try:
        reply = request_status(settings.put.socket)
    except SkyferryError as e:  # e.g. not in the socket's group: the store still tells a lot
        reply = {"ok": False, "unreachable": True, "error": str(e)}
    data = with_daemon(status_data(settings, time.time()), reply)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    _print_queue(data)
    from agent.cli.windows_report import status_lines

    for line in [*daemon_lines(data), *status_lines(data["gate"])]:
        print(line)
    return 0


def _print_queue(data: dict[str, Any]) -> None:
    from agent.config.units import format_duration, format_size

    print(f"site {data['site']}   {data['queued_objects']} objects queued "
          f"({format_size(data['queued_bytes'])})")
    print(f"{'class':<10} {'state':<10} {'items':>8} {'bytes':>12}  oldest queued")
    for name, c in data["classes"].items():
        age = c["oldest_queued_age_s"]
        states = c["items"] or {"queued": 0}
        for i, (state, n) in enumerate(sorted(states.items())):
            shown_age = format_duration(age) if (i == 0 and age is not None) else ""
            print(f"{name if i == 0 else '':<10} {state:<10} {n:>8} "
                  f"{format_size(c['bytes'].get(state, 0)):>12}  {shown_age}")
