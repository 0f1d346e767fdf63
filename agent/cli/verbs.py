"""The verb registry: every `skyferry` verb, in the order `skyferry --help` lists them.

A verb is one module in agent/cli/ with NAME, HELP, `add_arguments(parser)` and
`main(args) -> int`; adding a verb is that module plus one line here. Verb modules import
what they run inside `main`, so `skyferry --help` and a quick `put` stay light.
"""

from __future__ import annotations

import argparse
from typing import Protocol

from agent.cli import (
    check_config,
    command,
    keygen,
    land,
    put,
    restore,
    run,
    status,
    verify,
    windows,
)


class Verb(Protocol):
    NAME: str
    HELP: str

    def add_arguments(self, p: argparse.ArgumentParser) -> None: ...

    def main(self, args: argparse.Namespace) -> int: ...


VERBS: tuple[Verb, ...] = (run, check_config, keygen, command, put, status, windows, restore,
                           verify, land)
