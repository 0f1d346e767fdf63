"""Sizes, rates and durations: the forms the config accepts, and the errors for the rest."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.config.units import (
    format_duration,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4MiB", 4 * MIB),
        ("1.5GB", 1_500_000_000),
        ("512", 512),
        ("64KiB", 64 * KIB),
        ("1 GiB", GIB),
        ("10B", 10),
        ("1kB", 1000),
        ("2TB", 2 * 1000**4),
        ("1TiB", 1 << 40),
        ("0.5KiB", 512),
        (" 3 mib ", 3 * MIB),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15Mbit/s", 15_000_000 / 8),
        ("2Mbps", 250_000.0),
        ("10MB/s", 10_000_000.0),
        ("500KiB/s", 500 * 1024.0),
        ("1Gbit/s", 125_000_000.0),
        ("100", 100.0),
        ("8 bit/s", 1.0),
        ("3MBps", 3_000_000.0),
        (1000, 1000.0),
        (2.5, 2.5),
    ],
)
def test_parse_rate(text: str | float, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


def test_rate_bits_and_bytes_differ_by_case() -> None:
    assert parse_rate("8Mb/s") * 8 == parse_rate("8MB/s")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", 90.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("15m", 900.0),
        ("250ms", 0.25),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("30", 30.0),
        (12, 12.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["4M", "4XB", "abc", "", "1.5", "4 MiB/s", True, [1], 1.5])
def test_bad_size_names_the_accepted_forms(bad: object) -> None:
    with pytest.raises(ValueError, match=r'expected a size such as "4MiB"') as info:
        parse_size(bad)  # type: ignore[arg-type]
    assert f"(got {bad!r})" in str(info.value)


@pytest.mark.parametrize("bad", ["10MB", "fast", "1 foo/s", "", "10ps", False])
def test_bad_rate_names_the_accepted_forms(bad: object) -> None:
    with pytest.raises(ValueError, match=r'expected a rate such as "15Mbit/s"') as info:
        parse_rate(bad)  # type: ignore[arg-type]
    assert f"(got {bad!r})" in str(info.value)


@pytest.mark.parametrize("bad", ["1h30", "5 minutes", "", "h", "2H", float("nan"), None])
def test_bad_duration_names_the_accepted_forms(bad: object) -> None:
    with pytest.raises(ValueError, match=r'expected a duration such as "90s"'):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("parse", "value"),
    [
        (parse_size, "-1MiB"),
        (parse_size, -5),
        (parse_rate, "-10Mbit/s"),
        (parse_rate, -1.0),
        (parse_duration, "-5s"),
        (parse_duration, -0.1),
    ],
)
def test_negative_values_are_errors(parse: Callable[[object], object], value: object) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse(value)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, "0 B"), (512, "512 B"), (1536, "1.5 KiB"), (4 * MIB, "4.0 MiB"), (3 << 40, "3.0 TiB")],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (15, "15s"),
        (5400, "1h 30m"),
        (0.25, "250ms"),
        (90.5, "1m 30.5s"),
        (2 * 86400 + 61, "2d 1m 1s"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize("n", [0, 1, 512, KIB, 1536, 4 * MIB, 16 * MIB, 50 * GIB, 3 << 40])
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("seconds", [0, 0.25, 1, 15, 90, 90.5, 3600, 5400, 86400, 6 * 3600 + 1])
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
