"""What several verbs share: the --config option and reading the site config it names."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import SkyferryError

if TYPE_CHECKING:
    from agent.cloud.land_config import LandSettings
    from agent.config.settings import BackendSettings, Settings

DEFAULT_CONFIG = Path("/etc/skyferry/skyferry.toml")


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path,
                   default=Path(os.environ.get("SKYFERRY_CONFIG", DEFAULT_CONFIG)),
                   help="config file (default: $SKYFERRY_CONFIG or %(default)s)")


def load_settings(args: argparse.Namespace) -> Settings:
    from agent.daemon.site_config import load_settings as read

    return read(args.config)


def one_line(text: str) -> str:
    """Names may hold control characters (a newline, an escape sequence): shown escaped, so
    each problem stays one line and no name can write to the terminal or fake a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_backend_folder(url: str) -> None:
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


def land_settings(args: argparse.Namespace) -> tuple[LandSettings, BackendSettings, Path]:
    """land.toml (-c) with --source, --dest and --key over it, as `land` and `fleet` read it:
    the settings, the sealed store (which must exist) and the recipient key."""
    from agent.cloud.land_config import load_land_settings

    settings = load_land_settings(args.config, args.source, args.dest)
    if settings.source is None:
        raise SkyferryError("give --source URL (the sealed store), or a [source] table in -c")
    key = args.key or settings.key
    if key is None:
        raise SkyferryError("give --key PATH (the recipient private key), or key in [land]")
    check_backend_folder(settings.source.url)
    return settings, settings.source, key
