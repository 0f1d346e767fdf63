"""The verb registry: every `skyferry` verb, in the order `skyferry --help` lists them.

A verb is one module in agent/cli/ with NAME, HELP, `add_arguments(parser)` and
`main(args) -> int`; adding a verb is that module plus one line here. Verb modules import
what they run inside `main`, so `skyferry --help` and a quick `put` stay light.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Protocol, cast


class Verb(Protocol):
    NAME: str
    HELP: str

    def add_arguments(self, p: argparse.ArgumentParser) -> None: ...

    def main(self, args: argparse.Namespace) -> int: ...


# Module names in agent/cli/, in the order of `skyferry --help`. A command loads only its own
# verb's module (`named`): loading every verb (asyncio, the restore and land machinery) cost
# each `skyferry put` tens of milliseconds before it could say a word to the daemon.
MODULES = ("run", "check_config", "keygen", "command", "put", "status", "windows", "restore",
           "verify", "land", "fleet")


def _load(module: str) -> Verb:
    return cast(Verb, importlib.import_module(f"agent.cli.{module}"))


def named(name: str) -> Verb | None:
    """The verb called `name` (its module alone loaded), or None if there is none."""
    module = name.replace("-", "_")
    return _load(module) if module in MODULES else None


def __getattr__(attr: str) -> tuple[Verb, ...]:
    """VERBS: every verb, in order (for `skyferry --help`)."""
    if attr == "VERBS":
        return tuple(_load(m) for m in MODULES)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
