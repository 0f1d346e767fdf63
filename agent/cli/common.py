"""What several verbs share: the --config option and reading the site config it names."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config.settings import Settings

DEFAULT_CONFIG = Path("/etc/skyferry/skyferry.toml")


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path,
                   default=Path(os.environ.get("SKYFERRY_CONFIG", DEFAULT_CONFIG)),
                   help="config file (default: $SKYFERRY_CONFIG or %(default)s)")


def load_settings(args: argparse.Namespace) -> Settings:
    from agent.daemon.site_config import load_settings as read

    return read(args.config)
