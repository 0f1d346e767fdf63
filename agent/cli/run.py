"""`skyferry run`: the agent itself, what the systemd unit starts."""

from __future__ import annotations

import argparse
import asyncio

from agent.cli.common import add_config_argument

NAME = "run"
HELP = "run the agent (what the systemd unit starts)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)


def main(args: argparse.Namespace) -> int:
    from agent.daemon.preflight import load_checked, print_problems
    from agent.daemon.wiring import run_daemon
    from agent.errors import ConfigError
    from agent.host.memory import fix_malloc_thresholds
    from agent.obs.logs import setup_logging

    try:  # the checks of `check-config`, so both give the same verdict
        settings = load_checked(args.config)
    except ConfigError as e:
        print_problems(e, "skyferry run: error: ")
        return 2
    setup_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    # Chunks (up to 16 MiB) and their compressed copies come and go on several threads: each
    # in a mapping of its own, given back when freed (agent/host/memory.py).
    fix_malloc_thresholds()
    asyncio.run(run_daemon(settings, args.config))
    return 0
