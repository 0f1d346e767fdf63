"""Real, published two-line elements (public data) and ground sites for the window tests.

- ISS (ZARYA), ~400 km LEO at 51.6 deg: the set skyfield's own test suite ships (2018-05-15).
- NOAA 19, sun-synchronous polar orbiter (~850 km, 99.2 deg), as published 2018-10-15.
- STARLINK-1008, ~550 km at 53 deg, as published 2024-11-12.
Checksums are the published ones (checked by the parser).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

ISS = """ISS (ZARYA)
1 25544U 98067A   18135.61844383  .00002728  00000-0  48567-4 0  9998
2 25544  51.6402 181.0633 0004018  88.8954  22.2246 15.54059185113452
"""

NOAA19 = """NOAA 19
1 33591U 09005A   18288.64852564  .00000055  00000-0  55330-4 0  9992
2 33591  99.1559 269.1434 0013899 353.0306   7.0669 14.12312703499172
"""

STARLINK = """STARLINK-1008
1 44714U 19074B   24317.96008386  .00012565  00000+0  86086-3 0  9997
2 44714  53.0525 189.1887 0001532 102.3567 257.7594 15.06403837276145
"""

SATELLITES = {"iss": ISS, "noaa19": NOAA19, "starlink": STARLINK}


@dataclass(frozen=True)
class Site:
    name: str
    latitude: float
    longitude: float
    altitude_m: float


# A mid-latitude site and a southern-hemisphere one: all three orbits pass over both.
BERLIN = Site("berlin", 52.52, 13.405, 40.0)
HOBART = Site("hobart", -42.88, 147.33, 50.0)
SITES = {"berlin": BERLIN, "hobart": HOBART}


def with_epoch(text: str, when: datetime) -> str:
    """The same elements re-stamped with another epoch (checksum fixed): a satellite whose
    elements are as fresh (or as stale) as a test needs, for predictions around `when`."""
    from agent.windows.elements import tle_checksum

    when = when.astimezone(UTC)
    start = datetime(when.year, 1, 1, tzinfo=UTC)
    day = 1 + (when - start).total_seconds() / 86400
    stamp = f"{when.year % 100:02d}{day:012.8f}"
    out = []
    for line in text.strip().splitlines():
        if line.startswith("1 "):
            line = line[:18] + stamp + line[32:68]
            line += str(tle_checksum(line))
        out.append(line)
    return "\n".join(out) + "\n"
