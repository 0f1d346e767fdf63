"""`skyferry keygen`: a site's key set, or an operator's command-signing key."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.errors import SkyferryError

NAME = "keygen"
HELP = ("create the recipient, site signing and dedup keys "
        "(or, with --operator, an operator's command-signing key)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder to create the keys in")
    p.add_argument("--site", help="site id (as in [site] id); needed without --operator")
    p.add_argument("--operator", action="store_true",
                   help="make operator.key (keep it on the cloud side) and operator.pub (list "
                        "it in the site's [mqtt.status] operator_keys) for `skyferry command`")


def main(args: argparse.Namespace) -> int:
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
