"""The `skyferry` command: the parser assembled from the verb registry, and the dispatch."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from agent import __version__
from agent.cli import verbs
from agent.cli.verbs import Verb
from agent.errors import SkyferryError

EXIT_SIGPIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def parser(only: Verb | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (`only`) the one verb being run: the same parser for it."""
    ap = argparse.ArgumentParser(prog="skyferry", description=(
        "Store-and-forward sync for edge sites behind an intermittent satellite link."))
    ap.add_argument("--version", action="version", version=f"skyferry {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in (only,) if only is not None else verbs.VERBS:
        verb.add_arguments(sub.add_parser(verb.NAME, help=verb.HELP))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = verbs.named(argv[0]) if argv else None
    args = parser(only).parse_args(argv)
    verb: Verb = only or {v.NAME: v for v in verbs.VERBS}[args.command]
    try:
        return verb.main(args)
    except SkyferryError as e:
        print(f"skyferry {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `skyferry windows | head`: the reader has all it wanted
        return _stdout_gone()


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
