"""Reading one TOML table with problems reported by key path, each with a fix.

Every config section (and every backend and window source that owns keys) reads through `Table`,
so a problem always names where it is (`[backend] url`) and says what to write instead.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from datetime import date, time
from pathlib import Path
from typing import TypeVar

from agent.config import units
from agent.config.settings import SecretRef
from agent.errors import ConfigError

EXAMPLE = "config/skyferry.toml"

T = TypeVar("T")
U = TypeVar("U")

MAX_INTEGER = 1 << 53  # beyond this no integer key means anything (and floats lose it)

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

MISSING = object()


def short(value: object) -> str:
    """repr() cut to a length that keeps a problem on one readable line."""
    if value is MISSING:
        return "nothing"
    # TOML date-times read better the way they were written than as datetime.datetime(...).
    text = value.isoformat() if isinstance(value, date | time) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Table:
    """One TOML table being read: its key path, its values and the shared problem list."""

    def __init__(self, data: Mapping[str, object], where: str, problems: list[str]) -> None:
        self.data = data
        self.where = where
        self.problems = problems

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str) -> object:
        return self.data.get(name, MISSING)

    def report(self, name: str, what: str, fix: str) -> None:
        """Record a problem with the value at `name`."""
        self.problems.append(f"{self.key(name)}: {what} (got {short(self.raw(name))}); {fix}")

    def ensure(self, name: str, ok: bool, what: str, fix: str) -> None:
        if not ok:
            self.report(name, what, fix)

    def require(self, name: str, example: str) -> bool:
        """Record a problem if `name` is absent; `example` is a line the operator could add."""
        if name in self.data:
            return True
        section = f" under [{self.where}]" if self.where else ""
        self.problems.append(f"{self.key(name)}: required key is missing; add {example}{section}")
        return False

    def reject_unknown(self, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        for name in self.data:
            if name in allowed:
                continue
            close = difflib.get_close_matches(name, allowed, n=1)
            fix = (
                f"did you mean {close[0]!r}?"
                if close
                else f"remove it; valid keys here are {', '.join(allowed)}"
            )
            self.report(name, "unknown key", fix)

    def table(self, name: str, allowed: Iterable[str] | None = None) -> Table:
        """The sub-table `name` (empty when absent), with unknown keys reported."""
        value = self.raw(name)
        if value is MISSING:
            value = {}
        elif not isinstance(value, dict):
            self.report(name, "must be a table", f"write it as a [{self.key(name)}] section")
            value = {}
        child = Table(value, self.key(name), self.problems)
        if allowed is not None:
            child.reject_unknown(allowed)
        return child

    def tables(self, name: str, allowed: Iterable[str], how: str) -> list[Table]:
        """An array of tables such as [[spool]]; `how` tells how to write one entry."""
        value = self.raw(name)
        if value is MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.report(name, "must be an array of tables", how)
            return []
        items = [Table(v, f"{self.key(name)}[{i}]", self.problems) for i, v in enumerate(value)]
        for item in items:
            item.reject_unknown(allowed)
        return items

    def string(self, name: str, default: T) -> str | T:
        value = self.raw(name)
        if value is MISSING:
            return default
        if not isinstance(value, str):
            self.report(name, "must be a string", f'put the value in quotes, e.g. {name} = "..."')
            return default
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.string(name, None)
        if value is None:
            return default
        if value not in options:
            quoted = ", ".join(f'"{o}"' for o in options)
            self.report(name, "is not one of the accepted values", f"use one of {quoted}")
            return default
        return value

    def integer(self, name: str, default: int) -> int:
        value = self.raw(name)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.report(
                name,
                "must be an integer",
                f"write a whole number without quotes, e.g. {name} = {default}",
            )
            return default
        if abs(value) > MAX_INTEGER:
            self.report(name, "is far too large", "give a number of sensible size")
            return default
        return value

    def number(self, name: str, default: float) -> float:
        value = self.raw(name)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.report(
                name, "must be a number", f"write a number without quotes, e.g. {name} = {default}"
            )
            return default
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            number = math.inf
        if not math.isfinite(number):
            self.report(name, "must be a finite number", f"e.g. {name} = {default}")
            return default
        return number

    def path(self, name: str, base: Path, default: T) -> Path | T:
        """A path; relative ones are taken from the config file's directory."""
        text = self.string(name, None)
        if text is None:
            return default
        if not text:
            self.report(name, "must not be empty", "give a path, absolute or relative to this file")
            return default
        if "\0" in text:  # no file system takes one; os calls raise ValueError on it
            self.report(name, "holds a NUL character", "give the path without \\u0000")
            return default
        return base / Path(text).expanduser()

    def _unit(self, name: str, parse: Callable[[str | float], T], forms: str, default: U) -> T | U:
        value = self.raw(name)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.report(name, "has the wrong type", forms)
            return default
        try:
            return parse(value)
        except ValueError as exc:
            self.problems.append(f"{self.key(name)}: {exc}")
            return default

    def size(self, name: str, default: U) -> int | U:
        return self._unit(name, units.parse_size, units.SIZE_FORMS, default)

    def duration(self, name: str, default: U) -> float | U:
        return self._unit(name, units.parse_duration, units.DURATION_FORMS, default)

    def rate(self, name: str, default: U) -> float | U:
        return self._unit(name, units.parse_rate, units.RATE_FORMS, default)

    def positive(self, name: str, value: float | None, fix: str) -> None:
        """Report a parsed duration, size or rate that is zero."""
        self.ensure(name, value is None or value > 0, "must be greater than zero", fix)

def boolean(t: Table, name: str, default: bool) -> bool:
    value = t.raw(name)
    if value is MISSING:
        return default
    if not isinstance(value, bool):
        t.report(name, "must be true or false", f"write {name} = true or {name} = false, "
                 "without quotes")
        return default
    return value

def env_name(t: Table, name: str) -> str | None:
    value = t.string(name, None)
    if value is not None and ENV_NAME_RE.fullmatch(value) is None:
        t.report(name, "is not an environment variable name",
                 'give the name of the variable, not its value, e.g. "AZURE_STORAGE_KEY"')
        return None
    return value


def one_of(t: Table, *names: str) -> None:
    given = [n for n in names if t.has(n)]
    if len(given) > 1:
        t.report(given[-1], f"conflicts with {given[0]}", f"keep only one of {', '.join(names)}")


def secret(t: Table, name: str, base: Path) -> SecretRef | None:
    """`<name>_file` (a path) or `<name>_env` (a variable name); the value is read at open."""
    file_key, env_key = f"{name}_file", f"{name}_env"
    one_of(t, file_key, env_key)
    path = t.path(file_key, base, None)
    if path is not None:
        return SecretRef("file", str(path))
    env = env_name(t, env_key)
    return SecretRef("env", env) if env is not None else None


def read_toml(path: Path) -> dict[str, object]:
    where = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problem = (
            f"config file not found: {path}; copy the documented example {EXAMPLE}, edit it, "
            f"then run `skyferry check-config {path}`"
        )
        raise ConfigError([problem], where) from None
    except OSError as exc:
        problem = (
            f"cannot read the config file: {exc.strerror} (got {where!r}); "
            "give the path of a readable TOML file"
        )
        raise ConfigError([problem], where) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = (
            f"the file is not UTF-8 text (got byte {raw[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8"
        )
        raise ConfigError([problem], where) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([syntax_problem(exc, text)], where) from None


def syntax_problem(exc: tomllib.TOMLDecodeError, text: str) -> str:
    """Put the line and column tomllib buried in its message first, and show that line."""
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        line, column = int(match[1]), int(match[2])
        message = message[: match.start()]
    else:
        # tomllib says "(at end of document)": the problem is on the last line.
        message = re.sub(r"\s*\(at end of document\)$", "", message)
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    lines = text.splitlines()
    source = lines[line - 1] if 0 < line <= len(lines) else ""
    return (
        f"line {line}, column {column}: invalid TOML: {message} (got {short(source.strip())}); "
        'fix the syntax there: strings need quotes (id = "x"), tables are [name], '
        "repeated tables are [[name]]"
    )
