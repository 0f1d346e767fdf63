"""Where S3 multipart pays off for a chunk: one PUT vs a resumable multipart upload
(agent/backends/s3_multipart.py, 5 MiB parts) on moto behind the fault proxy (40 ms RTT,
15 Mbit/s each way by default), interleaved, per chunk size.

What a multipart upload costs on a clean link is its extra round trips (look for an earlier
upload, create, a request per part, complete); what it saves is at a cut: a single PUT loses
what had crossed of the whole chunk, a multipart upload at most the part under way. With a
cut landing at a uniform point of an upload, the expected loss is half the chunk vs half a
part; `break-even cuts` is how many cuts per thousand uploads make the saving equal the cost.

    python -m benchmarks.s3_parts [--sizes 5.5MiB,8MiB,12MiB,16MiB] [--rtt 40ms]
        [--rate 15Mbit/s] [--trials 2] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.backends.config import load_backend_settings
from agent.backends.objstore import ObstoreBackend
from agent.backends.registry import open_backend
from agent.backends.s3_multipart import PART_SIZE
from agent.config.units import format_size, parse_duration, parse_rate, parse_size
from benchmarks.run import add_output_options, write_report, write_section
from tests.kits.emulators import new_cloud, start_moto

SECTION = "s3_parts"
MiB = 1 << 20
CHOSEN = (
    "Chosen: multipart above 8 MiB (agent/backends/s3_multipart.py THRESHOLD), for the bound "
    "it gives rather than for speed: a cut then costs at most the 5 MiB part under way "
    "instead of a whole chunk of up to 16 MiB (S3 allows no smaller parts, so Azure's 1 MiB "
    "is out of reach). By time alone parts do not pay off here: each of the extra requests "
    "(look for an earlier upload, create, complete, one per part) costs far more than the 40 "
    "ms round trip because moto answers slowly on this loaded machine, so the break-even cut "
    "rate is hundreds per 1000 uploads, while the short-outages schedule (a cut every 30 s, "
    "~7 uploads of 4 MiB between cuts) makes ~140. Against a real S3 endpoint (tens of ms per "
    "request) the extra cost is a few round trips."
)


@dataclass
class Row:
    size: int
    single_s: list[float]
    parts_s: list[float]

    @property
    def extra_s(self) -> float:
        return statistics.median(self.parts_s) - statistics.median(self.single_s)

    def break_even_per_1000(self, rate_bps: float) -> float | None:
        """Cuts per 1000 uploads at which the bytes a multipart upload saves at cuts take
        as long to send as its extra round trips cost on every upload."""
        saved_s = (self.size / 2 - min(PART_SIZE, self.size) / 2) / rate_bps
        return None if saved_s <= 0 else 1000 * max(0.0, self.extra_s) / saved_s


async def _time_put(b: ObstoreBackend, key: str, data: bytes) -> float:
    start = time.monotonic()
    result = await b.put_new(key, data)
    assert result.written
    return time.monotonic() - start


def measure(sizes: list[int], rtt_s: float, rate_bps: float, trials: int,
            work: Path) -> list[Row]:
    em = start_moto(work)
    try:
        cloud = new_cloud(work / "cloud", em, proxy=True)
        assert cloud.proxy is not None
        cloud.proxy.delay_s = rtt_s / 2
        cloud.proxy.rate_bps = cloud.proxy.down_rate_bps = rate_bps
        b = open_backend(load_backend_settings(cloud.write_config()))
        assert isinstance(b, ObstoreBackend) and b.resumable is not None
        parts = b.resumable
        rows = [Row(n, [], []) for n in sizes]

        async def run() -> None:
            for t in range(trials):
                for row in rows:
                    data = random.Random(row.size + t).randbytes(row.size)
                    for mode in (("single", "parts") if t % 2 == 0 else ("parts", "single")):
                        b.resumable = parts if mode == "parts" else None
                        parts.threshold = 0
                        took = await _time_put(b, f"{mode}/{row.size}/{t}", data)
                        (row.parts_s if mode == "parts" else row.single_s).append(took)

        asyncio.run(run())
        cloud.proxy.stop()
        return rows
    finally:
        em.stop()


def render(rows: list[Row], rtt_s: float, rate_bps: float, trials: int,
           command: list[str]) -> str:
    lines = [
        f"## S3 multipart for chunks: where parts pay off (`{' '.join(command)}`)", "",
        f"moto behind the fault proxy: {rtt_s * 1000:.0f} ms RTT, {rate_bps * 8 / 1e6:g} Mbit/s "
        f"each way; one PUT (obstore) vs a resumable multipart upload (aiobotocore, "
        f"{format_size(PART_SIZE)} parts: look for an earlier upload, create, parts, complete), "
        f"interleaved, median of {trials}. Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on "
        f"{platform.machine()} ({os.cpu_count()} cores), Python {platform.python_version()}; "
        "the machine was shared with other engineers' runs (loaded).", "",
        "| chunk | one PUT s | multipart s | extra s | extra | break-even cuts per 1000 "
        "uploads |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        single = statistics.median(r.single_s)
        be = r.break_even_per_1000(rate_bps)
        lines.append(f"| {format_size(r.size)} | {single:.2f} | "
                     f"{statistics.median(r.parts_s):.2f} | {r.extra_s:+.2f} | "
                     f"{r.extra_s / single:+.1%} | {'-' if be is None else f'{be:.0f}'} |")
    lines += ["", CHOSEN]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.s3_parts")
    ap.add_argument("--sizes", default="5.5MiB,8MiB,12MiB,16MiB")
    ap.add_argument("--rtt", default="40ms")
    ap.add_argument("--rate", default="15Mbit/s")
    ap.add_argument("--trials", type=int, default=2)
    add_output_options(ap)
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rtt, rate = parse_duration(args.rtt), parse_rate(args.rate)
    with tempfile.TemporaryDirectory(prefix="skyferry-s3parts-") as tmp:
        rows = measure(sizes, rtt, rate, args.trials, Path(tmp))
    write_report(rows, args.report_json)
    text = render(rows, rtt, rate, args.trials, ["python", "-m", "benchmarks.s3_parts", *argv])
    print(text)
    if not args.no_write:
        write_section(SECTION, text, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
