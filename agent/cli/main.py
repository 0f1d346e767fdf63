"""The `skyferry` command: thin, calls the modules that do the work."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import SkyferryError, StoreLockedError

DEFAULT_CONFIG = Path("/etc/skyferry/skyferry.toml")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path,
                   default=Path(os.environ.get("SKYFERRY_CONFIG", DEFAULT_CONFIG)),
                   help="config file (default: $SKYFERRY_CONFIG or %(default)s)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="skyferry", description=(
        "Store-and-forward sync for edge sites behind an intermittent satellite link."))
    ap.add_argument("--version", action="version", version=f"skyferry {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the agent (what the systemd unit starts)")
    _config_arg(p)

    p = sub.add_parser("check-config", help="validate a config file; exit 2 on any error")
    p.add_argument("file", type=Path)

    _key_parsers(sub)

    p = sub.add_parser("put", help="queue files now (through the daemon, or directly)")
    _config_arg(p)
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--priority", help="priority class (default: [put] priority)")
    p.add_argument("--name", help="name to restore the file as (only with one file)")

    p = sub.add_parser("status", help="queue by class and state, and the gate")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("windows", help="the coming contact windows (no daemon needed)")
    _config_arg(p)
    p.add_argument("--hours", type=float, default=24.0, help="how far ahead (default 24)")
    p.add_argument("--json", action="store_true",
                   help="a JSON array of windows, UTC ISO-8601 times")
    p.add_argument("--svg", type=Path, metavar="FILE",
                   help="also draw the windows and the planned drain of the queue per class")

    for name, helptext in (("restore", "rebuild files from the cloud into a folder"),
                           ("verify", "check every object in the cloud, write nothing")):
        p = sub.add_parser(name, help=helptext)
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
        p.add_argument("--since", type=_parse_since, help="only objects created since "
                       "this UTC time (ISO-8601, e.g. 2026-11-25 or 2026-11-25T10:00)")
        p.add_argument("--parallel", type=int, default=8, help="concurrent downloads")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress line (default: when stderr is a terminal)")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        if name == "restore":
            p.add_argument("--to", type=Path, required=True, help="target folder")
    return ap


def _key_parsers(sub: Any) -> None:
    """`keygen` and `command` (which signs with an operator key)."""
    p = sub.add_parser("keygen", help="create the recipient, site signing and dedup keys "
                       "(or, with --operator, an operator's command-signing key)")
    p.add_argument("--out", type=Path, required=True, help="folder to create the keys in")
    p.add_argument("--site", help="site id (as in [site] id); needed without --operator")
    p.add_argument("--operator", action="store_true",
                   help="make operator.key (keep it on the cloud side) and operator.pub (list "
                        "it in the site's [mqtt.status] operator_keys) for `skyferry command`")

    p = sub.add_parser("command", help="sign an operator command and publish it to a site")
    p.add_argument("action", choices=("pause", "resume", "flush", "priority"))
    p.add_argument("args", nargs="*", metavar="ARG", help="priority: OBJECT CLASS")
    p.add_argument("--key", type=Path, required=True,
                   help="operator private key (operator.key from keygen --operator)")
    p.add_argument("--site", required=True, help="the site's id")
    p.add_argument("--broker", default="127.0.0.1:1883", help="the site broker's HOST:PORT")
    p.add_argument("--topic-prefix", default="skyferry", help="[mqtt.status] topic_prefix")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password-file", type=Path, help="file whose first line is the password")
    p.add_argument("--ca-file", type=Path, help="CA certificate: connect with TLS")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="wait this long for the site's answer (0: do not wait; default 5)")


def _parse_since(text: str) -> datetime:
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = _COMMANDS[args.command]
        return handler(args)
    except SkyferryError as e:
        print(f"skyferry {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `skyferry windows | head`: the reader has all it wanted
        return _stdout_gone()


EXIT_SIGPIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def _stdout_gone() -> int:
    """The reader of stdout went away: send what is still buffered to /dev/null (so the final
    flush cannot fail again and print a traceback) and exit like a command killed by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_SIGPIPE


def run() -> None:
    """Console entry point: exit without interpreter teardown once the command is done.

    obstore 0.12 leaves runtime threads that can abort the process (SIGABRT, exit 134) while
    Python finalizes, after a complete and correct run; scripts must see the real exit code.
    """
    rc = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        rc = _stdout_gone()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)


def _load(args: argparse.Namespace) -> Any:
    from agent.config.reader import load_settings

    return load_settings(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon.preflight import load_checked, print_problems
    from agent.daemon.wiring import run_daemon
    from agent.errors import ConfigError
    from agent.obs.logs import setup_logging

    try:  # the checks of `check-config`, so both give the same verdict
        settings = load_checked(args.config)
    except ConfigError as e:
        print_problems(e, "skyferry run: error: ")
        return 2
    setup_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    asyncio.run(run_daemon(settings, args.config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.config.reader import check_config_main

    return check_config_main(args.file)


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.format.keys import generate_keys

    if args.operator:
        from agent.telemetry.command_auth import generate_operator_keys

        private, public = generate_operator_keys(args.out)
        print(f"operator key (keep private, where `skyferry command` runs): {private}")
        print(f"operator public key (list in the site's [mqtt.status] operator_keys): {public}")
        return 0
    if not args.site:
        raise SkyferryError("keygen needs --site ID (or --operator for an operator key)")
    keys = generate_keys(args.out, args.site)
    print(f"edge keys  (copy to the site, keep private): {keys.edge_dir}")
    print(f"cloud keys (keep where restore runs, never on the site): {keys.cloud_dir}")
    for f in keys.files:
        print(f"  {f}")
    return 0


PUT_WAIT_S = 30.0  # a starting daemon holds the store before its socket answers


def cmd_put(args: argparse.Namespace) -> int:
    from agent.sources.put_client import open_for_put

    settings = _load(args)
    priority = args.priority or settings.put.priority
    if priority not in [c.name for c in settings.classes]:
        print(f"skyferry put: error: unknown class {priority!r}; use one of: "
              f"{', '.join(c.name for c in settings.classes)}", file=sys.stderr)
        return 2
    if args.name and len(args.files) != 1:
        print("skyferry put: error: --name needs exactly one file", file=sys.stderr)
        return 2
    failed = 0
    sender = _PutSender(settings)
    try:
        for f in args.files:
            path = f.absolute()
            try:  # opened here, with the caller's rights: the daemon never opens a path
                fd = open_for_put(path)
            except SkyferryError as e:
                print(f"skyferry put: {e}", file=sys.stderr)
                failed += 1
                continue
            try:
                reply = sender.put(fd, path, args.name or f.resolve().name, priority)
            finally:
                os.close(fd)
            if reply.get("ok"):
                note = " (already queued)" if reply.get("duplicate") else ""
                print(f"{f}: accepted as object {reply['object']}{note}")
            else:
                print(f"skyferry put: {f}: {reply.get('error')}", file=sys.stderr)
                failed += 1
    finally:
        sender.close()
    return 1 if failed else 0


class _PutSender:
    """Through the daemon's socket when it answers, else straight into the store; a daemon
    that is starting holds the store before it answers, so both are tried for a while."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.direct: _DirectIngest | None = None

    def put(self, fd: int, path: Path, name: str, priority: str) -> dict[str, Any]:
        from agent.sources.put import PUT_SOURCE
        from agent.sources.put_client import request_put

        deadline = time.monotonic() + PUT_WAIT_S
        while True:
            if self.direct is None:
                reply = request_put(self.settings.put.socket, fd, path, name, priority)
                if reply is not None:
                    return reply
            try:
                self.direct = self.direct or _DirectIngest(self.settings)
            except StoreLockedError as e:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(f"{e} (waited {PUT_WAIT_S:g}s)") from None
                time.sleep(0.1)
                continue
            return self.direct.put(fd, path, name, priority, PUT_SOURCE)

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()


class _DirectIngest:
    """No daemon runs: write into the store ourselves; the daemon uploads it when it starts."""

    def __init__(self, settings: Any) -> None:
        from agent.format.keys import load_edge_keys
        from agent.ingest.pipeline import Pipeline
        from agent.store.store import Store

        # Keys first: a missing or unsafe key must not create or touch the store.
        keys = load_edge_keys(settings.keys.recipient_public, settings.keys.signing_key,
                              settings.keys.dedup_key)
        try:
            self.store = Store(settings.site.state_dir, settings.classes,
                               settings.store.quota_bytes)
        except StoreLockedError:
            raise StoreLockedError(
                f"the daemon holds {settings.site.state_dir} but does not answer on "
                f"{settings.put.socket}; check `[put] socket` and the daemon's log") from None
        self.pipeline = Pipeline(settings.site.id, keys, self.store, settings.chunking,
                                 settings.compression)

    def put(self, fd: int, path: Path, name: str, priority: str,
            source: str) -> dict[str, Any]:
        from agent.ingest.requests import IngestRequest
        from agent.sources.put_client import reader_of

        req = IngestRequest(path, source, name, priority, opener=reader_of(fd),
                            seen=os.fstat(fd))
        try:
            r = self.pipeline.ingest_file(req)
        except SkyferryError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "object": r.object_id, "duplicate": r.duplicate_of is not None}

    def close(self) -> None:
        self.store.close()


def status_data(settings: Any, now: float) -> dict[str, Any]:
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


def cmd_status(args: argparse.Namespace) -> int:
    from agent.cli.status_view import daemon_lines, with_daemon
    from agent.config.units import format_duration, format_size
    from agent.sources.put_client import request_status

    settings = _load(args)
    try:
        reply = request_status(settings.put.socket)
    except SkyferryError as e:  # e.g. not in the socket's group: the store still tells a lot
        reply = {"ok": False, "unreachable": True, "error": str(e)}
    data = with_daemon(status_data(settings, time.time()), reply)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
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
    from agent.cli.windows_report import status_lines

    for line in [*daemon_lines(data), *status_lines(data["gate"])]:
        print(line)
    return 0


def cmd_windows(args: argparse.Namespace) -> int:
    from agent.cli.windows_report import print_windows, windows_data

    settings = _load(args)
    if args.hours <= 0:
        print("skyferry windows: error: --hours must be greater than 0", file=sys.stderr)
        return 2
    now = time.time()
    if args.json:
        print(json.dumps(windows_data(settings, now, args.hours), indent=2))
        if args.svg is None:
            return 0
    return print_windows(settings, now, args.hours, args.svg, quiet=args.json)


def _backend_settings(args: argparse.Namespace) -> Any:
    from agent.backends.config import load_backend_settings
    from agent.config.settings import BackendSettings

    if args.backend_config is not None:
        return load_backend_settings(args.backend_config, url=args.backend)
    if args.backend is None:
        raise SkyferryError("give --backend URL, or --backend-config FILE with a [backend] table")
    return BackendSettings(url=args.backend)


MAX_PARALLEL = 256


def _one_line(text: str) -> str:
    """Names may hold control characters (a newline, an escape sequence): shown escaped, so
    each problem stays one line and no name can write to the terminal or fake a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _check_backend_folder(url: str) -> None:
    """Reading a file:// backend that does not exist is a mistake, not an empty cloud (opening
    one for writing creates the folder)."""
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced [ or ]: open_backend says so
        return
    if parts.scheme.lower() == "file" and not Path(unquote(parts.path)).is_dir():
        raise SkyferryError(f"backend folder {unquote(parts.path)} ({url}) does not exist: "
                            "check the --backend URL")


def cmd_restore(args: argparse.Namespace) -> int:
    from agent.backends.core import open_backend
    from agent.cloud.restore import Restorer, site_key_loader
    from agent.format.keys import load_recipient_private
    from agent.host.memory import fix_malloc_thresholds

    if not 1 <= args.parallel <= MAX_PARALLEL:
        raise SkyferryError(f"--parallel must be between 1 and {MAX_PARALLEL} concurrent "
                            f"downloads, not {args.parallel}")
    settings = _backend_settings(args)
    _check_backend_folder(settings.url)
    fix_malloc_thresholds()  # peak RSS stays bounded (agent/host/memory.py)
    backend = open_backend(settings)
    recipient = load_recipient_private(args.key)
    restorer = Restorer(backend, recipient, site_key_loader(args.key.parent), args.parallel)
    target = args.to if args.command == "restore" else None
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
            print(f"PROBLEM {_one_line(p.what)}: {_one_line(p.reason)}", file=sys.stderr)
        print(f"{verb} {report.objects_ok} objects ({report.bytes_ok} bytes) from "
              f"{report.manifests} manifests; {report.superseded} older versions skipped; "
              f"{len(report.problems)} problems")
    return 0 if report.ok else 1


def cmd_command(args: argparse.Namespace) -> int:
    from agent.telemetry.command_send import Target, parse_broker, send_command

    command: dict[str, Any] = {"cmd": args.action}
    if (args.action == "priority") != bool(args.args):
        raise SkyferryError("priority takes OBJECT CLASS; the other commands take nothing")
    if args.action == "priority":
        if len(args.args) != 2:
            raise SkyferryError("priority takes exactly OBJECT CLASS")
        command["object"], command["class"] = args.args
    host, port = parse_broker(args.broker)
    password = None
    if args.password_file is not None:
        try:
            password = (args.password_file.read_text().splitlines() or [""])[0]
        except OSError as e:
            raise SkyferryError(f"cannot read {args.password_file}: {e.strerror}") from None
    target = Target(host, port, args.site, args.topic_prefix.strip("/"), args.username,
                    password, args.ca_file)
    answer = send_command(args.key, target, command, args.wait)
    if answer is None:
        print(f"sent {args.action} to {target.prefix}/{args.site}/cmd"
              + (f"; no answer within {args.wait:g}s" if args.wait > 0 else ""))
        return 0 if args.wait <= 0 else 1
    print(f"{args.site}: {answer.get('cmd')} {answer.get('result')}: {answer.get('detail')}")
    return 0 if answer.get("ok") else 1


_COMMANDS = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "keygen": cmd_keygen,
    "command": cmd_command,
    "put": cmd_put,
    "status": cmd_status,
    "windows": cmd_windows,
    "restore": cmd_restore,
    "verify": cmd_restore,
}
