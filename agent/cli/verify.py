"""`skyferry verify`: check every object in the cloud as restore would, writing nothing."""

from __future__ import annotations

import argparse

from agent.cli.restore import add_cloud_arguments, restore_or_verify

NAME = "verify"
HELP = "check every object in the cloud, write nothing"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_cloud_arguments(p)


def main(args: argparse.Namespace) -> int:
    return restore_or_verify(args, None)
