"""`skyferry command`: sign an operator command, publish it to a site, wait for its answer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.errors import SkyferryError

NAME = "command"
HELP = "sign an operator command and publish it to a site"


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def main(args: argparse.Namespace) -> int:
    from agent.telemetry.command_send import Target, parse_broker, send_command

    command: dict[str, Any] = {"cmd": args.action}
    if (args.action == "priority") != bool(args.args):
        raise SkyferryError("priority takes OBJECT CLASS; the other commands take nothing")
    if args.action == "priority":
        if len(args.args) != 2:
            raise SkyferryError("priority takes exactly OBJECT CLASS")
        command["object"], command["class"] = args.args
    host, port = parse_broker(args.broker)
    target = Target(host, port, args.site, args.topic_prefix.strip("/"), args.username,
                    _password(args.password_file), args.ca_file)
    answer = send_command(args.key, target, command, args.wait)
    if answer is None:
        print(f"sent {args.action} to {target.prefix}/{args.site}/cmd"
              + (f"; no answer within {args.wait:g}s" if args.wait > 0 else ""))
        return 0 if args.wait <= 0 else 1
    print(f"{args.site}: {answer.get('cmd')} {answer.get('result')}: {answer.get('detail')}")
    return 0 if answer.get("ok") else 1


def _password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return (path.read_text().splitlines() or [""])[0]
    except OSError as e:
        raise SkyferryError(f"cannot read {path}: {e.strerror}") from None
