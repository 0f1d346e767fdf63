"""`skyferry land`: sealed objects from the cloud become plain files (with metadata) in any
backend, verified before they are visible; `--once` lands what is there and exits."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from agent.cli.common import one_line
from agent.errors import SkyferryError

NAME = "land"
HELP = "land sealed objects as plain files in a destination backend"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", type=Path,
                   help="land.toml: [source] and [dest] backend tables (credentials as *_file "
                        "/ *_env keys) and [land] (poll, backfill, key, work_dir)")
    p.add_argument("--source", metavar="URL",
                   help="the sealed store: file:///path, azure://container/prefix, "
                        "s3://bucket/prefix or gs://bucket/prefix (overrides [source] url)")
    p.add_argument("--dest", metavar="URL",
                   help="where plain files go, any backend URL (overrides [dest] url)")
    p.add_argument("--key", type=Path,
                   help="recipient private key (overrides [land] key); site public keys are "
                        "read from sites/<site>.pub beside it")
    p.add_argument("--once", action="store_true",
                   help="land what is there now and exit (0: everything landed or was "
                        "quarantined with a reason)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="with --once: progress line (default: when stderr is a terminal)")
    p.add_argument("--json", action="store_true", help="with --once: print the report as JSON")


def main(args: argparse.Namespace) -> int:
    from agent.backends.registry import open_backend
    from agent.cloud.land import Lander
    from agent.cloud.land_config import load_land_settings
    from agent.cloud.restore import site_key_loader
    from agent.format.keys import load_recipient_private
    from agent.host.memory import fix_malloc_thresholds

    settings = load_land_settings(args.config, args.source, args.dest)
    if settings.source is None:
        raise SkyferryError("give --source URL (the sealed store), or a [source] table in -c")
    if settings.dest is None:
        raise SkyferryError("give --dest URL (where plain files go), or a [dest] table in -c")
    key = args.key or settings.key
    if key is None:
        raise SkyferryError("give --key PATH (the recipient private key), or key in [land]")
    _check_source_folder(settings.source.url)
    if not settings.work_dir.is_dir():
        raise SkyferryError(f"work_dir {settings.work_dir} is not a folder: create it or change "
                            "[land] work_dir")
    fix_malloc_thresholds()
    recipient = load_recipient_private(key)
    lander = Lander(open_backend(settings.source), open_backend(settings.dest), recipient,
                    site_key_loader(key.parent), settings.work_dir, settings.parallel)
    if not args.once:
        from agent.obs.logs import setup_logging

        setup_logging("info", "auto")
        asyncio.run(_until_stopped(lander.run(settings.poll_s, settings.backfill_s)))
        return 0
    import logging

    # The report below says it all: log records are not echoed to stderr a second time.
    logging.getLogger("skyferry").addHandler(logging.NullHandler())
    report = asyncio.run(lander.land_once(show_progress=args.progress))
    if args.json:
        print(json.dumps({
            "manifests": report.manifests, "files": report.files, "bytes": report.bytes,
            "superseded": report.superseded,
            "quarantined": [{"what": p.what, "reason": p.reason} for p in report.quarantined],
        }, indent=2))
    else:
        for p in report.quarantined:
            print(f"QUARANTINED {one_line(p.what)}: {one_line(p.reason)}", file=sys.stderr)
        print(f"landed {report.files} files ({report.bytes} bytes) from {report.manifests} "
              f"manifests into {settings.dest.url}; {report.superseded} older versions skipped; "
              f"{len(report.quarantined)} quarantined")
    return 0


async def _until_stopped(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` until SIGTERM or SIGINT: a file being landed is abandoned whole (nothing
    partial is visible) and lands again at the next start."""
    import signal

    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _check_source_folder(url: str) -> None:
    from agent.cli.restore import _check_backend_folder

    _check_backend_folder(url)
