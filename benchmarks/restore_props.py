"""The restore/verify properties (tests/unit/test_restore_props.py) with many more examples.

Usage: python -m benchmarks.restore_props [--examples N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.run import write_section

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.restore_props", description=__doc__)
    ap.add_argument("--examples", type=int, default=5000, help="examples per property")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SKYFERRY_PROPS_PROFILE": "bench",
           "SKYFERRY_PROPS_EXAMPLES": str(args.examples)}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/unit/test_restore_props.py"], cwd=ROOT, env=env)
    verdict = "all properties held" if r.returncode == 0 else "a property FAILED (see output)"
    write_section("restore_props", (
        f"## Restore properties (`python -m benchmarks.restore_props --examples "
        f"{args.examples}`)\n\n{args.examples} examples per property: {verdict}. Wall time "
        f"{time.monotonic() - start:.0f} s, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC."))
    return r.returncode


if __name__ == "__main__":
    raise SystemExit(main())
