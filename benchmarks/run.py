"""`make bench`: run every benchmark in turn; each rewrites its own section of RESULTS.md.

Usage: python -m benchmarks.run [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
import sys
import time
from collections.abc import Iterable
from contextlib import redirect_stdout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# name -> (module, argv for a full run, argv for --quick)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "windows_predict": ("benchmarks.windows_predict", [], []),
    "backend_throughput": ("benchmarks.backend_throughput", [], []),
    "mqtt_ingest": ("benchmarks.mqtt_ingest", [], []),
    "ingest": ("benchmarks.ingest", [], ["--size", "64MiB", "--runs", "1"]),
    "compression": ("benchmarks.compression", [], ["--size", "64MiB"]),
    "crash_trials": ("benchmarks.crash_trials", ["--trials", "200", "--seed", "13"],
                     ["--trials", "20", "--seed", "13"]),
    "link": ("benchmarks.link", [], ["--size", "64MiB", "--up", "10-20", "--down", "3-6"]),
    # One run per backend (the section names it), so each can run beside the other.
    **{f"link_short_outages_{b}": ("benchmarks.link",
                                   ["--schedule", "short-outages", "--backend", b, "--size",
                                    "128MiB"],
                                   ["--schedule", "short-outages", "--backend", b, "--size",
                                    "32MiB"]) for b in ("azure", "s3")},
    "s3_parts": ("benchmarks.s3_parts", ["--trials", "3"], ["--trials", "1", "--sizes", "8MiB"]),
    "disk_full": ("benchmarks.disk_full", ["--fs", "ext4", "tmpfs"],
                  ["--size", "32MiB", "--quiet", "6"]),
    "restore_props": ("benchmarks.restore_props", ["--examples", "5000"],
                      ["--examples", "1000"]),
    "land": ("benchmarks.land", [], ["--files", "100", "--big", "20MiB", "--lag-objects", "60"]),
    "land_queue": ("benchmarks.land_queue", [], ["--manifests", "60", "--kills", "10"]),
    "latency": ("benchmarks.latency", [], ["--trials", "20", "--bulk", "256MiB"]),
    "backlog": ("benchmarks.backlog", [], ["--scales", "1", "10", "--claims", "300"]),
}


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the `<!-- name -->` section of RESULTS.md."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def publish(name: str, body: str, write: bool,
            verdicts: Iterable[tuple[str, bool | None, str]], path: Path = RESULTS) -> int:
    """Print a benchmark's section, write it to RESULTS.md (or `path`) unless told not to, and
    return the exit code: 1 when an acceptance line misses (None: not measured, not a miss)."""
    print(body)
    if write:
        write_section(name, body, path)
    return 0 if all(held is not False for _, held, _ in verdicts) else 1


def plain(obj: Any) -> Any:
    """A report as JSON-ready data: dataclasses become dicts of their fields and properties,
    tuples lists, anything else not JSON its str()."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for name in dir(type(obj)):
            if isinstance(getattr(type(obj), name), property):
                out[name] = plain(getattr(obj, name))
        return out
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def write_report(report: Any, path: Path | None) -> None:
    """`--report-json PATH`: the whole report, for scripts and the smoke tests."""
    if path is not None:
        path.write_text(json.dumps(plain(report), indent=1, sort_keys=True) + "\n")


def add_output_options(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark takes for where its figures go."""
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="the results file whose section is rewritten (default: RESULTS.md)")
    ap.add_argument("--report-json", type=Path, default=None,
                    help="also write every figure measured to this file, as JSON")


def run_one(name: str, quick: bool) -> int:
    module, full, small = BENCHMARKS[name]
    argv = small if quick else full
    print(f"== {name}: python -m {module} {' '.join(argv)}", flush=True)
    main = importlib.import_module(module).main
    if name != "crash_trials":
        return int(main(argv) or 0)
    # crash_trials prints a summary line; record it here with the command that made it.
    out = io.StringIO()
    started = time.monotonic()
    with redirect_stdout(out):
        rc = int(main(argv) or 0)
    print(out.getvalue(), end="")
    summary = out.getvalue().strip().splitlines()[-1] if out.getvalue().strip() else "(none)"
    write_section("crash_trials", (
        f"## Crash trials (`python -m benchmarks.crash_trials {' '.join(argv)}`)\n\n"
        f"{summary}\n\n"
        f"Each trial drops files, `kill -9`s the daemon 1-3 times at random instants while "
        f"ingest and upload run, restarts, drains, then restores and verifies: every accepted "
        f"file exactly once, byte-identical. Wall time {time.monotonic() - started:.0f} s, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC."))
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller runs")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    ap.add_argument("--list", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    if args.list:
        for name in args.only or list(BENCHMARKS):
            module, full, small = BENCHMARKS[name]
            print(f"{name}: {' '.join(['python', '-m', module, *(small if args.quick else full)])}")
        return 0
    failed = [n for n in (args.only or list(BENCHMARKS)) if run_one(n, args.quick) != 0]
    if failed:
        print(f"benchmarks that missed their target or failed: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
