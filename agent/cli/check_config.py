"""`skyferry check-config FILE`: the checks `run` applies at start, without starting."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "check-config"
HELP = "validate a config file; exit 2 on any error"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path)


def main(args: argparse.Namespace) -> int:
    from agent.daemon.preflight import check_config_main

    return check_config_main(args.file)
