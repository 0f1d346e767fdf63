"""A plausible satellite constellation and the time to predict its passes over one site.

The element sets are made from one real, published set (ISS, 2018-05-15) by spreading the
right ascension of the ascending node and the mean anomaly, with new catalog numbers and
correct checksums, so their passes are as hard to find as real ones.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent.config.settings import TleSettings
from agent.windows.elements import tle_checksum
from agent.windows.tle import TleSource

BASE = """ISS (ZARYA)
1 25544U 98067A   18135.61844383  .00002728  00000-0  48567-4 0  9998
2 25544  51.6402 181.0633 0004018  88.8954  22.2246 15.54059185113452
"""
# Berlin, 10 degrees minimum elevation.
LAT, LON, ALT = 52.52, 13.405, 40.0

def _with_checksum(line: str) -> str:
    return line[:68] + str(tle_checksum(line))


def constellation(n: int, base: str = BASE) -> str:
    """`n` element sets from `base`, spread over RAAN and mean anomaly (3-line format)."""
    _, line1, line2 = base.strip().splitlines()
    out = []
    for i in range(n):
        catalog = f"{90000 + i:05d}"
        raan = (float(line2[17:25]) + i * 360.0 / n) % 360.0
        anomaly = (float(line2[43:51]) + i * 137.508) % 360.0  # golden angle: no clumping
        l1 = line1[:2] + catalog + line1[7:]
        l2 = f"{line2[:2]}{catalog}{line2[7:17]}{raan:8.4f}{line2[25:43]}{anomaly:8.4f}{line2[51:]}"
        out += [f"SAT-{i:03d}", _with_checksum(l1), _with_checksum(l2)]
    return "\n".join(out) + "\n"


def measure(workdir: Path, satellites: int = 100,
            hours: float = 24.0) -> tuple[float, int, int]:
    """Seconds to load the elements and predict `hours` of passes; passes; merged windows."""
    path = workdir / "constellation.tle"
    path.write_text(constellation(satellites))
    settings = TleSettings(files=(path,), latitude_deg=LAT, longitude_deg=LON, altitude_m=ALT,
                           min_elevation_deg=10.0)
    start = time.perf_counter()
    source = TleSource(settings)
    t0 = source.element_sets[0].epoch
    windows = source.predict(t0, t0 + hours * 3600)
    return time.perf_counter() - start, source.last_pass_count, len(windows)
