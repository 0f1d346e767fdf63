"""Orbital elements from TLE and OMM (JSON, CSV, XML) files, checked field by field.

Every parse error names the file, the line and the field, e.g.
`relay.tle:7: line 2, field "inclination" (columns 9-16): not a number (got '51.6a02')`.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.windows import WindowFileError


@dataclass(frozen=True)
class ElementSet:
    """One satellite's elements as read from a file (not yet turned into a propagator)."""

    name: str
    catalog: str
    epoch: float  # Unix seconds
    where: str  # "file:line" (or "file:record N"), for messages
    line1: str | None = None  # TLE
    line2: str | None = None
    omm: dict[str, str] | None = None  # OMM fields, normalized for sgp4.omm.initialize


# (name, first column, last column) with 1-based inclusive columns as in the TLE definition.
_NUMBER = r"\s*[+-]?(?:\d+\.?\d*|\.\d+)"  # right-aligned: leading blanks
_EXP = r"\s*[+-]?\d{5}[+-]\d"  # an assumed-decimal number with exponent, e.g. " 48567-4"
_L1: tuple[tuple[str, int, int, str], ...] = (
    ("line number", 1, 1, r"1"),
    ("catalog number", 3, 7, r"[0-9A-Z ]\d{4}|\s*\d{1,5}"),
    ("classification", 8, 8, r"[UCS ]"),
    ("epoch year", 19, 20, r"\d\d"),
    ("epoch day", 21, 32, r"[ \d]{0,2}\d\.\d+"),
    ("mean motion derivative", 34, 43, _NUMBER),
    ("mean motion second derivative", 45, 52, _EXP),
    ("bstar drag term", 54, 61, _EXP),
    ("ephemeris type", 63, 63, r"[\d ]"),
    ("element set number", 65, 68, r"\s*\d*"),
    ("checksum", 69, 69, r"\d"),
)
_L2: tuple[tuple[str, int, int, str], ...] = (
    ("line number", 1, 1, r"2"),
    ("catalog number", 3, 7, r"[0-9A-Z ]\d{4}|\s*\d{1,5}"),
    ("inclination", 9, 16, _NUMBER),
    ("right ascension of the ascending node", 18, 25, _NUMBER),
    ("eccentricity", 27, 33, r"\d{7}"),
    ("argument of perigee", 35, 42, _NUMBER),
    ("mean anomaly", 44, 51, _NUMBER),
    ("mean motion", 53, 63, _NUMBER),
    ("revolution number", 64, 68, r"\s*\d*"),
    ("checksum", 69, 69, r"\d"),
)
_RANGES = {"inclination": (0.0, 180.0), "right ascension of the ascending node": (0.0, 360.0),
           "argument of perigee": (0.0, 360.0), "mean anomaly": (0.0, 360.0),
           "mean motion": (0.05, 20.0), "epoch day": (1.0, 367.0)}


def tle_checksum(line: str) -> int:
    """Modulo-10 sum of the digits of the first 68 columns, minus signs counting 1."""
    return sum(int(c) if c.isdigit() else (1 if c == "-" else 0) for c in line[:68]) % 10


def _check_line(path: str, lineno: int, text: str, which: int) -> None:
    spec = _L1 if which == 1 else _L2
    for name, a, b, pattern in spec:
        cols = f"column {a}" if a == b else f"columns {a}-{b}"
        field = f'line {which}, field "{name}" ({cols})'
        value = text[a - 1:b]
        if len(value) < b - a + 1 and not (name == "checksum" and len(text) == 68):
            raise WindowFileError(path, lineno, field,
                                  f"missing: the line has {len(text)} characters, a TLE line 69")
        if name == "checksum":
            if len(value) == 0:
                raise WindowFileError(path, lineno, field,
                                      "missing: the line has 68 characters, a TLE line 69")
            if not value.isdigit():
                raise WindowFileError(path, lineno, field, f"not a digit (got {value!r})")
            want = tle_checksum(text)
            if int(value) != want:
                raise WindowFileError(
                    path, lineno, field,
                    f"is {value} but the line sums to {want}: the line was damaged or edited; "
                    "fetch the elements again")
            continue
        if re.fullmatch(pattern, value) is None:
            raise WindowFileError(path, lineno, field, f"not a valid value (got {value!r})")
        if name in _RANGES:
            lo, hi = _RANGES[name]
            number = float(value)
            if not lo <= number <= hi:
                raise WindowFileError(path, lineno, field,
                                      f"{number:g} is outside {lo:g}..{hi:g}")
    if len(text) > 69:
        raise WindowFileError(path, lineno, f"line {which}, length",
                              f"the line has {len(text)} characters, a TLE line 69")


def _tle_epoch(line1: str) -> float:
    year = int(line1[18:20])
    year += 1900 if year >= 57 else 2000
    day = float(line1[20:32])
    return (datetime(year, 1, 1, tzinfo=UTC) + timedelta(days=day - 1)).timestamp()


def parse_tle_text(text: str, path: str) -> list[ElementSet]:
    """Two- or three-line element sets; a line before a line 1 (or `0 NAME`) names it."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    out: list[ElementSet] = []
    i = 0
    pending_name: tuple[int, str] | None = None
    while i < len(lines):
        ln = lines[i]
        if not ln.strip():
            i += 1
            continue
        if ln.startswith("1 "):
            _check_line(path, i + 1, ln, 1)
            j = i + 1
            if j >= len(lines) or not lines[j].startswith("2 "):
                raise WindowFileError(path, j + 1, "line 2",
                                      f"missing: the line 1 on line {i + 1} must be followed by "
                                      "its line 2 (starting with '2 ')")
            _check_line(path, j + 1, lines[j], 2)
            if lines[j][2:7] != ln[2:7]:
                raise WindowFileError(
                    path, j + 1, 'line 2, field "catalog number" (columns 3-7)',
                    f"is {lines[j][2:7].strip()!r} but line 1 says {ln[2:7].strip()!r}: the two "
                    "lines belong to different satellites")
            catalog = ln[2:7].strip()
            name = pending_name[1] if pending_name else catalog
            out.append(ElementSet(name=name, catalog=catalog, epoch=_tle_epoch(ln),
                                  where=f"{path}:{i + 1}", line1=ln[:69], line2=lines[j][:69]))
            pending_name = None
            i = j + 1
            continue
        if ln.startswith("2 "):
            raise WindowFileError(path, i + 1, "line 1",
                                  "missing: this line 2 has no line 1 (starting with '1 ') "
                                  "before it")
        if pending_name is not None:
            raise WindowFileError(
                path, pending_name[0], "name",
                f"{pending_name[1]!r} is not followed by a TLE line 1 (line {i + 1} is "
                f"{ln[:30]!r}); each satellite is an optional name line, then line 1 and line 2")
        name = ln[2:].strip() if ln.startswith("0 ") else ln.strip()
        pending_name = (i + 1, name)
        i += 1
    if pending_name is not None:
        raise WindowFileError(path, pending_name[0], "line 1",
                              f"missing: the name {pending_name[1]!r} is not followed by its "
                              "element lines")
    return out


# OMM: the fields sgp4 needs, and defaults for the bookkeeping ones it insists on.
_OMM_NUMBERS = ("MEAN_MOTION", "ECCENTRICITY", "INCLINATION", "RA_OF_ASC_NODE",
                "ARG_OF_PERICENTER", "MEAN_ANOMALY", "BSTAR", "MEAN_MOTION_DOT",
                "MEAN_MOTION_DDOT")
_OMM_DEFAULTS = {"CLASSIFICATION_TYPE": "U", "OBJECT_ID": "", "EPHEMERIS_TYPE": "0",
                 "ELEMENT_SET_NO": "999", "REV_AT_EPOCH": "0", "MEAN_MOTION_DDOT": "0"}


def _omm_record(raw: dict[str, Any], path: str, line: int | None, where: str) -> ElementSet:
    fields = {k.upper(): "" if v is None else str(v).strip() for k, v in raw.items()}
    for k, v in _OMM_DEFAULTS.items():
        if not fields.get(k):
            fields[k] = v
    label = f"{where}, field"
    for name in ("NORAD_CAT_ID", "EPOCH", *_OMM_NUMBERS):
        if not fields.get(name):
            raise WindowFileError(path, line, f"{label} {name}", "missing")
    for name in _OMM_NUMBERS:
        try:
            number = float(fields[name])
        except ValueError:
            raise WindowFileError(path, line, f"{label} {name}",
                                  f"not a number (got {fields[name]!r})") from None
        if not math.isfinite(number):
            raise WindowFileError(path, line, f"{label} {name}", "not a finite number")
    if not fields["NORAD_CAT_ID"].isdigit():
        raise WindowFileError(path, line, f"{label} NORAD_CAT_ID",
                              f"not a catalog number (got {fields['NORAD_CAT_ID']!r})")
    for name in ("EPHEMERIS_TYPE", "ELEMENT_SET_NO", "REV_AT_EPOCH"):
        if not fields[name].lstrip("-").isdigit():
            raise WindowFileError(path, line, f"{label} {name}",
                                  f"not a whole number (got {fields[name]!r})")
    try:
        epoch = datetime.fromisoformat(fields["EPOCH"].replace("Z", ""))
    except ValueError:
        raise WindowFileError(path, line, f"{label} EPOCH",
                              f"not an ISO-8601 time (got {fields['EPOCH']!r})") from None
    if epoch.tzinfo is not None:
        epoch = epoch.astimezone(UTC).replace(tzinfo=None)
    fields["EPOCH"] = epoch.strftime("%Y-%m-%dT%H:%M:%S.%f")  # the form sgp4.omm expects
    return ElementSet(name=fields.get("OBJECT_NAME") or fields["NORAD_CAT_ID"],
                      catalog=fields["NORAD_CAT_ID"], epoch=epoch.replace(tzinfo=UTC).timestamp(),
                      where=f"{path}:{line}" if line else f"{path} {where}", omm=fields)


def parse_omm_json(text: str, path: str) -> list[ElementSet]:
    """CelesTrak / Space-Track JSON: an array of OMM records (or one record)."""
    dec = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos:pos + 1] == "{":
        text = "[" + text[pos:] + "]"
        pos = 0
    if text[pos:pos + 1] != "[":
        raise WindowFileError(path, 1, "OMM JSON", "expected an array of OMM records")
    out: list[ElementSet] = []
    pos += 1
    index = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise WindowFileError(path, e.lineno, "OMM JSON", e.msg) from None
        index += 1
        if not isinstance(record, dict):
            raise WindowFileError(path, line, f"record {index}", "is not a JSON object")
        out.append(_omm_record(record, path, line, f"record {index}"))
    return out


def parse_omm_csv(text: str, path: str) -> list[ElementSet]:
    reader = csv.DictReader(io.StringIO(text))
    out = []
    for index, row in enumerate(reader, start=1):
        out.append(_omm_record(dict(row), path, reader.line_num, f"record {index}"))
    return out


def parse_omm_xml(text: str, path: str) -> list[ElementSet]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise WindowFileError(path, e.position[0], "OMM XML", str(e)) from None
    out = []
    for index, segment in enumerate(root.iter("segment"), start=1):
        fields: dict[str, Any] = {}
        for part in ("metadata", "data/meanElements", "data/tleParameters"):
            node = segment.find(part)
            if node is not None:
                fields.update((child.tag, child.text) for child in node)
        out.append(_omm_record(fields, path, None, f"segment {index}"))
    return out


def parse_elements(text: str, path: str) -> list[ElementSet]:
    """Any supported element file, told apart by its first character or header."""
    head = text.lstrip()[:1]
    if head in ("[", "{"):
        return parse_omm_json(text, path)
    if head == "<":
        return parse_omm_xml(text, path)
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if "OBJECT_NAME" in first.upper() or "NORAD_CAT_ID" in first.upper():
        return parse_omm_csv(text, path)
    return parse_tle_text(text, path)


def read_elements(path: Path) -> list[ElementSet]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WindowFileError(str(path), None, "file",
                              "not found; fetch the elements (e.g. from CelesTrak) into it"
                              ) from None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or a NUL in the name
        raise WindowFileError(str(path), None, "file", f"cannot read it: {e}") from None
    sets = parse_elements(text, str(path))
    if not sets:
        raise WindowFileError(str(path), None, "file", "holds no element set")
    return sets


def select(sets: Sequence[ElementSet], patterns: Sequence[str]) -> list[ElementSet]:
    """Keep the sets whose name matches a glob, or whose catalog number is listed."""
    if not patterns:
        return list(sets)
    pats = [p.upper() for p in patterns]
    return [s for s in sets if any(
        fnmatch.fnmatchcase(s.name.upper(), p) or s.catalog.lstrip("0") == p.lstrip("0")
        for p in pats)]
