"""The documented example configuration (config/skyferry.toml), made runnable under a folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.format.keys import generate_keys

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "skyferry.toml"


def example_site(root: Path) -> Path:
    """The documented example with its absolute paths moved under `root` and its keys made."""
    text = EXAMPLE.read_text()
    for old, new in (("/var/lib/skyferry-cloud", root / "cloud"),
                     ("/var/lib/skyferry", root / "state"), ("/srv/spool", root / "spool")):
        text = text.replace(old, str(new))
    root.mkdir(parents=True)
    (root / "skyferry.toml").write_text(text)
    keys = generate_keys(root / "gen", "camp-alpha")
    shutil.copytree(keys.edge_dir, root / "keys")  # keys/... relative to the config file
    for name in ("sensors", "camera"):
        (root / "spool" / name).mkdir(parents=True)
    return root / "skyferry.toml"
