"""`skyferry fleet`: every site, its last contact and what its heartbeat says, read from the
stores the lander uses (land.toml); no running lander needed. The same view as the lander's
fleet page (agent/cloud/fleet_page.py)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from agent.cli.common import land_settings, one_line

NAME = "fleet"
HELP = "show every site's last contact, backlog and health from its heartbeats"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", type=Path,
                   help="land.toml: [source] the sealed store, [dest] where the lander lands "
                        "(its landing figures; optional), [land] key and silent_after")
    p.add_argument("--source", metavar="URL", help="the sealed store (overrides [source] url)")
    p.add_argument("--dest", metavar="URL",
                   help="the lander's destination (overrides [dest] url)")
    p.add_argument("--key", type=Path,
                   help="recipient private key (overrides [land] key); the fleet is the sites "
                        "whose public keys are in sites/<site>.pub beside it")
    p.add_argument("--json", action="store_true", help="print the fleet as JSON")


def main(args: argparse.Namespace) -> int:
    import asyncio

    from agent.backends.registry import open_backend
    from agent.cloud.fleet import FleetWatch
    from agent.cloud.restore import site_key_loader
    from agent.format.keys import load_recipient_private

    settings, source, key = land_settings(args)
    fleet = FleetWatch(open_backend(source),
                       None if settings.dest is None else open_backend(settings.dest),
                       load_recipient_private(key), site_key_loader(key.parent), key.parent)
    asyncio.run(fleet.refresh(full=True))
    data = fleet.to_json(time.time(), settings.silent_after_s)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print_table(data)
    return 0


def print_table(data: dict[str, Any]) -> None:
    from agent.cloud.fleet_page import COLUMNS, attention, backlog_by_class, cells

    rows = [{c: one_line(v) for c, v in cells(s).items()} for s in data["sites"]]
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in COLUMNS}
    print("  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip())
    for s, r in zip(data["sites"], rows, strict=True):
        print("  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip())
        if by := backlog_by_class(s):
            print(f"  {'':{widths['site']}}backlog by class: {by}")
    summary = data["summary"]
    print(f"{summary['sites']} sites, {summary['silent']} silent, {summary['never']} never "
          f"heard from, {summary['untrusted']} with untrusted heartbeats")
    for note in attention(data):
        print(f"ATTENTION {one_line(note)}")
