"""Upload throughput to an object-store emulator through a 40 ms RTT, 20 Mbit/s link.

The daemon uploads a pre-queued payload of random (incompressible) bytes to moto (S3) or Azurite
(Azure Blob) through `tests.kits.faultproxy.FaultProxy`, which adds 20 ms each way and caps the
upstream rate. Goodput is the sealed bytes stored in the bucket divided by the time between the
first and the last upstream byte leaving the capped link; the target is at least 90 % of the cap.

    python -m benchmarks.backend_throughput [--size 64MiB] [--backend moto|azurite]
        [--rtt 40ms] [--rate 20Mbit/s] [--streams 4] [--no-write]

prints the figures and records them in the `backend_throughput` section of
benchmarks/RESULTS.md; exits 1 when the goodput is below 90 % of the cap.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.config.units import parse_duration, parse_rate, parse_size
from tests.kits.emulators import start_azurite, start_moto
from tests.kits.throughput import TARGET, Measurement, measure

RESULTS = Path(__file__).parent / "RESULTS.md"
SECTION = "backend_throughput"
def write_results(m: Measurement, path: Path = RESULTS) -> None:
    """Replace (or add) only this benchmark's section of RESULTS.md."""
    start, end = f"<!-- {SECTION} -->", f"<!-- /{SECTION} -->"
    body = "\n".join([
        start,
        "## Backend upload throughput (`python -m benchmarks.backend_throughput`)",
        "",
        f"{m.summary()}; target >= {TARGET:.0%} of the cap.",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.machine()}, Python "
        f"{platform.python_version()}, through tests/kits/faultproxy.py (delay and token-bucket "
        "rate cap in user space).",
        end,
    ])
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        text = text[:text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.backend_throughput",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default="64MiB", help="payload size (default 64MiB)")
    ap.add_argument("--backend", choices=("moto", "azurite"), default="moto")
    ap.add_argument("--rtt", default="40ms", help="round-trip time added (default 40ms)")
    ap.add_argument("--rate", default="20Mbit/s", help="upstream cap (default 20Mbit/s)")
    ap.add_argument("--streams", type=int, default=4, help="upload streams (default 4)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="skyferry-throughput-") as tmp:
        work = Path(tmp)
        (work / "emulator").mkdir()
        start = start_moto if args.backend == "moto" else start_azurite
        emulator = start(work / "emulator")
        try:
            began = time.monotonic()
            m = measure(emulator, work / "run", parse_size(args.size), parse_duration(args.rtt),
                        parse_rate(args.rate), args.streams)
        finally:
            emulator.stop()
    print(m.summary())
    print(f"(whole run {time.monotonic() - began:.1f} s)")
    if not args.no_write:
        write_results(m)
    return 0 if m.utilisation >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
