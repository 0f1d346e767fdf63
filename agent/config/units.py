"""Human-friendly sizes, rates and durations: parsing for the config file, formatting for logs.

Every parse error reads `<what is wrong> (got <value>); <accepted forms>`, so a section reader
only has to put the key path in front.
"""

from __future__ import annotations

import math
import re

SIZE_FORMS = 'expected a size such as "4MiB", "1.5GB", "64KiB" or "512" (bytes)'
RATE_FORMS = (
    'expected a rate such as "15Mbit/s", "2Mbps", "10MB/s", "500KiB/s" or "1000000" (bytes/s)'
)
DURATION_FORMS = (
    'expected a duration such as "90s", "15m", "2h", "1h30m", "250ms", "1d" or "30" (seconds)'
)

# Prefixes are matched case-insensitively: "kb" and "KB" both mean 1000 bytes.
_PREFIXES: dict[str, int] = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}
_NUMBER = r"(?P<number>\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)\s*")
_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_IEC_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")

# The largest values the config accepts. Far beyond any real setting, yet small enough that
# every computation with them stays finite (a 400-digit size or an infinite duration would
# otherwise reach float conversion, timers and the stream sizing); documented in the example.
MAX_SIZE = 1 << 50  # 1024 TiB
MAX_SIZE_TEXT = "1024TiB"
MAX_DURATION_S = 3650 * 86400.0  # 10 years
MAX_DURATION_TEXT = "3650d"
MAX_RATE_BPS = 100e9 / 8  # 100 Gbit/s
MAX_RATE_TEXT = "100Gbit/s"


def _fail(what: str, value: object, forms: str) -> ValueError:
    return ValueError(f"{what} (got {value!r}); {forms}")


def _check_number(value: object, kind: str, forms: str) -> float:
    """Accept a plain int or float (not bool) that is finite and not negative."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"not a {kind}", value, forms)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer with hundreds of digits
        raise _fail(f"{kind} is far too large", _shown(value), forms) from None
    if not finite:
        raise _fail(f"{kind} must be a finite number", _shown(value), forms)
    if value < 0:
        raise _fail(f"{kind} must not be negative", value, forms)
    return float(value)


def _shown(value: object) -> object:
    """The value for an error message, cut short: a 400-digit number is not worth echoing."""
    text = str(value)
    return value if len(text) <= 40 else text[:37] + "..."


def _at_most(value: float, limit: float, kind: str, limit_text: str, raw: object,
             forms: str) -> None:
    if not value <= limit:  # also catches NaN
        raise _fail(f"{kind} is larger than the largest accepted ({limit_text})", _shown(raw),
                    forms)


def _split_number(text: str, kind: str, forms: str) -> tuple[float, str]:
    """Split " 1.5 GiB " into (1.5, "GiB"); reject signs and other junk with the accepted forms."""
    stripped = text.strip()
    if stripped.startswith("-"):
        raise _fail(f"{kind} must not be negative", text, forms)
    match = re.fullmatch(_NUMBER + r"\s*(?P<rest>.*)", stripped)
    if match is None:
        raise _fail(f"not a {kind}", text, forms)
    return float(match["number"]), match["rest"]


def _parse_size(value: str | int | float) -> int:
    """Parse "4MiB", "1.5GB", "512" or a whole number into bytes (SI is 1000^n, IEC 1024^n)."""
    if not isinstance(value, str):
        number = _check_number(value, "size", SIZE_FORMS)
        if not number.is_integer():
            raise _fail("a size in bytes must be a whole number", value, SIZE_FORMS)
        return int(number)
    number, rest = _split_number(value, "size", SIZE_FORMS)
    unit = rest.strip().lower()
    if unit.endswith("b"):
        unit = unit[:-1]
    elif unit:
        raise _fail(f"unknown size unit {rest.strip()!r}", value, SIZE_FORMS)
    if unit not in _PREFIXES:
        raise _fail(f"unknown size unit {rest.strip()!r}", value, SIZE_FORMS)
    size = number * _PREFIXES[unit]
    _at_most(size, MAX_SIZE, "size", MAX_SIZE_TEXT, value, SIZE_FORMS)
    if not size.is_integer() and unit == "":
        raise _fail("a size in bytes must be a whole number", value, SIZE_FORMS)
    return round(size)


def _parse_rate(value: str | int | float) -> float:
    """Parse "15Mbit/s", "2Mbps", "10MB/s", "500KiB/s" or a number into bytes per second."""
    if not isinstance(value, str):
        return _check_number(value, "rate", RATE_FORMS)
    number, rest = _split_number(value, "rate", RATE_FORMS)
    unit = rest.strip()
    if unit.endswith("/s"):
        unit = unit[:-2].strip()
    elif unit.endswith(("bps", "Bps")):
        unit = unit[:-2]
    elif unit:
        raise _fail(f"a rate needs '/s' or 'ps' after the unit {unit!r}", value, RATE_FORMS)
    return number * _rate_unit(unit, value)


def _rate_unit(unit: str, value: object) -> float:
    """Bytes per second for one unit; lower-case "b" is bits, upper-case "B" is bytes."""
    if unit == "":
        return 1.0
    if unit.lower().endswith("bits") or unit.lower().endswith("bit"):
        prefix, per_unit = unit.lower().rstrip("s")[:-3], 1 / 8
    elif unit.endswith("b"):
        prefix, per_unit = unit[:-1], 1 / 8
    elif unit.endswith("B"):
        prefix, per_unit = unit[:-1], 1.0
    else:
        raise _fail(f"unknown rate unit {unit!r}", value, RATE_FORMS)
    multiplier = _PREFIXES.get(prefix.lower())
    if multiplier is None:
        raise _fail(f"unknown rate unit {unit!r}", value, RATE_FORMS)
    return multiplier * per_unit


def _parse_duration(value: str | int | float) -> float:
    """Parse "90s", "1h30m", "250ms", "1d" or a number of seconds into seconds."""
    if not isinstance(value, str):
        return _check_number(value, "duration", DURATION_FORMS)
    text = value.strip()
    if text.startswith("-"):
        raise _fail("duration must not be negative", value, DURATION_FORMS)
    if re.fullmatch(_NUMBER, text):
        return float(text)
    total, position = 0.0, 0
    while position < len(text):
        match = _DURATION_PART_RE.match(text, position)
        if match is None:
            raise _fail("not a duration", value, DURATION_FORMS)
        total += float(match[1]) * _DURATION_UNITS[match[2]]
        position = match.end()
    if position == 0:
        raise _fail("not a duration", value, DURATION_FORMS)
    return total


def parse_size(value: str | int | float) -> int:
    """Parse "4MiB", "1.5GB", "512" or a whole number into bytes (SI is 1000^n, IEC 1024^n),
    at most MAX_SIZE."""
    size = _parse_size(value)
    _at_most(size, MAX_SIZE, "size", MAX_SIZE_TEXT, value, SIZE_FORMS)
    return size


def parse_rate(value: str | int | float) -> float:
    """Parse "15Mbit/s", "2Mbps", "10MB/s", "500KiB/s" or a number into bytes per second,
    at most MAX_RATE_BPS."""
    rate = _parse_rate(value)
    _at_most(rate, MAX_RATE_BPS, "rate", MAX_RATE_TEXT, value, RATE_FORMS)
    return rate


def parse_duration(value: str | int | float) -> float:
    """Parse "90s", "1h30m", "250ms", "1d" or a number of seconds into seconds, at most
    MAX_DURATION_S."""
    seconds = _parse_duration(value)
    _at_most(seconds, MAX_DURATION_S, "duration", MAX_DURATION_TEXT, value, DURATION_FORMS)
    return seconds


def format_size(n: int) -> str:
    """Format bytes with IEC units: 512 -> "512 B", 4194304 -> "4.0 MiB"."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _IEC_UNITS:
        value /= 1024
        if value < 1024 or unit == _IEC_UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def format_duration(seconds: float) -> str:
    """Format seconds the way the config accepts them: 5400 -> "1h 30m", 0.25 -> "250ms"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if 0 < seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    fraction = round(seconds - whole, 3)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if secs or fraction or not parts:
        parts.append(f"{secs + fraction:g}s")
    return " ".join(parts)
