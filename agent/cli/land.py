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
from typing import TYPE_CHECKING, Any

from agent.cli.common import land_settings, one_line
from agent.errors import SkyferryError

if TYPE_CHECKING:
    from agent.cloud.land import Lander, LandReport
    from agent.cloud.land_config import LandSettings

NAME = "land"
HELP = "land sealed objects as plain files in a destination backend"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", type=Path,
                   help="land.toml: [source] and [dest] backend tables (credentials as *_file "
                        "/ *_env keys), [land] (poll, backfill, key, work_dir, discovery), "
                        "[queue] (a work queue shared by many workers) and [events] (MQTT, "
                        "webhook); listen and silent_after for the fleet page")
    p.add_argument("--source", metavar="URL",
                   help="the sealed store: file:///path, azure://container/prefix, "
                        "s3://bucket/prefix or gs://bucket/prefix (overrides [source] url)")
    p.add_argument("--dest", metavar="URL",
                   help="where plain files go, any backend URL (overrides [dest] url)")
    p.add_argument("--key", type=Path,
                   help="recipient private key (overrides [land] key); site public keys are "
                        "read from sites/<site>.pub beside it")
    p.add_argument("--once", action="store_true",
                   help="land what is there now, by this process alone (no [queue]), and exit "
                        "(0: everything landed or was quarantined with a reason; 1: the "
                        "destination refused some, each named: landed by the next run)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="with --once: progress line (default: when stderr is a terminal)")
    p.add_argument("--json", action="store_true", help="with --once: print the report as JSON")


def main(args: argparse.Namespace) -> int:
    from agent.host.memory import fix_malloc_thresholds

    settings, _, key = land_settings(args)
    if settings.dest is None:
        raise SkyferryError("give --dest URL (where plain files go), or a [dest] table in -c")
    if not settings.work_dir.is_dir():
        raise SkyferryError(f"work_dir {settings.work_dir} is not a folder: create it or change "
                            "[land] work_dir")
    fix_malloc_thresholds()
    lander = _lander(settings, key)
    if not args.once:
        from agent.obs.logs import setup_logging

        setup_logging("info", "auto")
        from agent.cloud.land_serve import land_with_view  # the fleet page, with [land] listen

        asyncio.run(_until_stopped(land_with_view(lander, settings, key.parent,
                                                  _serve(lander, settings))))
        return 0
    import logging

    # The report below says it all: log records are not echoed to stderr a second time.
    logging.getLogger("skyferry").addHandler(logging.NullHandler())
    if settings.queue is not None:  # workers on it may be landing beside this run
        from agent.cloud.land_queue import shared_markers

        shared_markers(lander, settings.queue)
    report = asyncio.run(_once(lander, args.progress))
    if args.json:
        print(json.dumps({
            "manifests": report.manifests, "files": report.files, "bytes": report.bytes,
            "superseded": report.superseded,
            "quarantined": [{"what": p.what, "reason": p.reason} for p in report.quarantined],
            "failed": [{"what": p.what, "reason": p.reason} for p in report.failed],
        }, indent=2))
    else:
        for p in report.quarantined:
            print(f"QUARANTINED {one_line(p.what)}: {one_line(p.reason)}", file=sys.stderr)
        for p in report.failed:
            print(f"NOT LANDED {one_line(p.what)}: {one_line(p.reason)}", file=sys.stderr)
        print(f"landed {report.files} files ({report.bytes} bytes) from {report.manifests} "
              f"manifests into {settings.dest.url}; {report.superseded} older versions skipped; "
              f"{len(report.quarantined)} quarantined; {len(report.failed)} not landed")
    return 1 if report.failed else 0  # the not landed are landed by the next run


def _lander(settings: LandSettings, key: Path) -> Lander:
    from agent.backends.registry import open_backend
    from agent.cloud.land import Lander
    from agent.cloud.land_events import Downstream
    from agent.cloud.restore import site_key_loader
    from agent.format.keys import load_recipient_private

    assert settings.source is not None and settings.dest is not None
    dest = open_backend(settings.dest)
    downstream = Downstream(settings.events, dest) if settings.events.enabled else None
    lander = Lander(open_backend(settings.source), dest, load_recipient_private(key),
                    site_key_loader(key.parent), settings.work_dir, settings.parallel,
                    downstream=downstream)
    if settings.delete_sealed_after_s is not None:  # retention (agent/cloud/land_retention.py)
        from agent.cloud.land_retention import Retention

        lander.retention = Retention(lander.backend, lander.dest, lander,
                                     settings.delete_sealed_after_s,
                                     settings.retention_margin_s, lander.worker)
    return lander


async def _once(lander: Lander, progress: bool | None) -> LandReport:
    """`--once`: a backfill, landed by this process alone (a [queue] is not used), and every
    event posted downstream before it exits."""
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(lander.staging.close)
        if lander.downstream is not None:
            await stack.enter_async_context(lander.downstream)
        report = await lander.land_once(show_progress=progress)
        if lander.downstream is not None:
            await lander.downstream.drain()
        return report


async def _serve(lander: Lander, settings: LandSettings) -> None:
    """The service: alone (listing), or one of the workers on [queue]."""
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(lander.staging.close)
        if lander.downstream is not None:
            await stack.enter_async_context(lander.downstream)
        if settings.queue is None:
            await lander.run(settings.poll_s, settings.backfill_s)
            return
        from agent.backends.workqueue import open_work_queue
        from agent.cloud.land_queue import run_with_queue

        q = settings.queue
        queue = open_work_queue(q.queue.url, q.queue.options)
        stack.push_async_callback(queue.aclose)
        await run_with_queue(lander, queue, q, settings.discovery, settings.poll_s,
                             settings.backfill_s)


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
