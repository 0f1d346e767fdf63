"""`skyferry --help` and every verb's help, pinned: a change to the CLI's surface is a decision,
made by updating tests/unit/cli_help/ in the same commit, never a side effect of a refactor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.verbs import VERBS

ROOT = Path(__file__).resolve().parents[2]
PINNED = Path(__file__).with_name("cli_help")


def help_text(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "agent", *args, "--help"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_verb_has_its_pinned_help_and_no_pinned_verb_is_gone() -> None:
    names = {v.NAME for v in VERBS}
    assert {p.stem for p in PINNED.glob("*.txt")} - {"skyferry"} == names


@pytest.mark.parametrize("verb", ["skyferry", *(v.NAME for v in VERBS)])
def test_help_is_unchanged(verb: str) -> None:
    args = () if verb == "skyferry" else (verb,)
    assert help_text(*args) == (PINNED / f"{verb}.txt").read_text()
