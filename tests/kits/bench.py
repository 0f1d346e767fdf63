"""The benchmarks run as their users run them (`python -m benchmarks.X ...`), for the smoke
tests: tests never import benchmarks/, they read what a run prints and writes (`--results`,
`--report-json`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class Record(dict[str, Any]):
    """A JSON object from `--report-json` whose keys read as attributes too (`r.tools`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def run_benchmark(module: str, *args: str | Path, timeout: float = 300
                  ) -> subprocess.CompletedProcess[str]:
    """`python -m benchmarks.<module> args...` from the repository root; its exit code, stdout
    and stderr (not checked here: a missed acceptance line exits 1 by design)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def load_report(path: Path) -> Any:
    return json.loads(path.read_text(), object_hook=Record)


def exit_code_for(verdicts: list[list[Any]]) -> int:
    """What a benchmark exits with for these acceptance lines (1 when one misses)."""
    return 0 if all(held is not False for _, held, _ in verdicts) else 1
