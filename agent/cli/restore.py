"""`skyferry restore`: rebuild files from the cloud into a folder. `verify` (agent/cli/verify.py)
is the same walk with nothing written, so both share the options and the run here."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.common import check_backend_folder, one_line
from agent.errors import SkyferryError

if TYPE_CHECKING:
    from agent.config.settings import BackendSettings

NAME = "restore"
HELP = "rebuild files from the cloud into a folder"

MAX_PARALLEL = 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_cloud_arguments(p)
    p.add_argument("--to", type=Path, required=True, help="target folder")


def main(args: argparse.Namespace) -> int:
    return restore_or_verify(args, args.to)


def add_cloud_arguments(p: argparse.ArgumentParser) -> None:
    """The options restore and verify share: where the cloud is, the key, what to walk."""
    p.add_argument("--backend", metavar="URL",
                   help="file:///path, azure://container/prefix, s3://bucket/prefix or "
                        "gs://bucket/prefix (overrides the url of --backend-config)")
    p.add_argument("--backend-config", metavar="FILE", type=Path,
                   help="a skyferry TOML file whose [backend] table (endpoint, region, "
                        "credentials as *_file / *_env keys, timeouts) is used; without "
                        "it, S3, Azure and GCS use their default credential chains")
    p.add_argument("--key", type=Path, required=True,
                   help="recipient private key (cloud/recipient.key from keygen); site "
                        "public keys are read from sites/<site>.pub beside it")
    p.add_argument("--site", action="append", help="only this site (repeatable)")
    p.add_argument("--since", type=parse_since, help="only objects created since "
                   "this UTC time (ISO-8601, e.g. 2026-11-25 or 2026-11-25T10:00)")
    p.add_argument("--parallel", type=int, default=8, help="concurrent downloads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress line (default: when stderr is a terminal)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def parse_since(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 time such as 2026-11-25T10:00") from None
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t
    try:
        t.astimezone(UTC)  # its UTC date folder must exist
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is outside the calendar in UTC") from None
    return t


def restore_or_verify(args: argparse.Namespace, target: Path | None) -> int:
    """Restore into `target`, or with None verify; 0 when every object was sound."""
    from agent.backends.registry import open_backend
    from agent.cloud.restore import Restorer, site_key_loader
    from agent.format.keys import load_recipient_private
    from agent.host.memory import fix_malloc_thresholds

    if not 1 <= args.parallel <= MAX_PARALLEL:
        raise SkyferryError(f"--parallel must be between 1 and {MAX_PARALLEL} concurrent "
                            f"downloads, not {args.parallel}")
    settings = _backend_settings(args)
    check_backend_folder(settings.url)
    fix_malloc_thresholds()  # peak RSS stays bounded (agent/host/memory.py)
    backend = open_backend(settings)
    recipient = load_recipient_private(args.key)
    restorer = Restorer(backend, recipient, site_key_loader(args.key.parent), args.parallel)
    report = asyncio.run(restorer.run(target, args.site, args.since, args.progress))
    verb = "restored" if target else "verified"
    if args.json:
        print(json.dumps({
            "ok": report.ok, "manifests": report.manifests, "objects_ok": report.objects_ok,
            "bytes_ok": report.bytes_ok, "superseded": report.superseded,
            "problems": [{"what": p.what, "reason": p.reason} for p in report.problems],
        }, indent=2))
    else:
        for p in report.problems:
            print(f"PROBLEM {one_line(p.what)}: {one_line(p.reason)}", file=sys.stderr)
        print(f"{verb} {report.objects_ok} objects ({report.bytes_ok} bytes) from "
              f"{report.manifests} manifests; {report.superseded} older versions skipped; "
              f"{len(report.problems)} problems")
    return 0 if report.ok else 1


def _backend_settings(args: argparse.Namespace) -> BackendSettings:
    from agent.backends.config import load_backend_settings
    from agent.config.settings import BackendSettings

    if args.backend_config is not None:
        return load_backend_settings(args.backend_config, url=args.backend)
    if args.backend is None:
        raise SkyferryError("give --backend URL, or --backend-config FILE with a [backend] table")
    return BackendSettings(url=args.backend)
