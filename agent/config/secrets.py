"""Secrets on disk and in the environment: the one rule for private files and the one reader.

A file that holds a secret (a private key, the dedup key, a password or credential file) is
refused when group or other users can access it, as ssh refuses a private key. Every reader of
such a file goes through `read_private`; `read_secret` reads what a `*_file` / `*_env` key names
(agent/config/table.py `secret`) when the backend or the broker connection is opened. Callers turn
`KeyFileError` into the error of their own room.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from agent.config.settings import SecretRef
from agent.errors import KeyFileError


def others_can_access(mode: int) -> bool:
    """The rule: group or others have any permission on the file."""
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def private_mode_problem(path: Path, mode: int) -> str | None:
    """Why a file of this mode may not hold a secret, or None."""
    if others_can_access(mode):
        return (f"{path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}")
    return None


def read_private(path: Path, what: str, *, private: bool = True, missing: str = "") -> bytes:
    """The bytes of a key or secret file; with `private`, refused when others can access it.

    The mode checked is the one of the file read (same descriptor), not of whatever the name
    points at afterwards. `missing` is the fix shown when the file does not exist.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist" + (f"; {missing}" if missing else "")
                           ) from None
    except OSError as e:
        raise KeyFileError(f"cannot read {what} {path}: {e.strerror}") from None
    problem = private_mode_problem(path, mode) if private else None
    if problem is not None:
        raise KeyFileError(f"{what} {problem}")
    return data


def read_secret(ref: SecretRef, environ: Mapping[str, str], what: str, *,
                first_line: bool = False, allow_empty: bool = False) -> str:
    """The value a SecretRef names: an environment variable, or a private file's text (all of
    it, stripped; or, with `first_line`, its first line as written)."""
    if ref.source == "env":
        value = environ.get(ref.where)
        if value is None or (not value and not allow_empty):
            raise KeyFileError(f"{what}: environment variable {ref.where} is not set (or empty); "
                               "set it in the service's environment (systemd: EnvironmentFile=)")
        return value if first_line else value.strip()
    path = Path(ref.where)
    try:
        text = read_private(path, what).decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{what} {path} is not UTF-8 text") from None
    value = (text.splitlines() or [""])[0] if first_line else text.strip()
    if not value and not allow_empty:
        raise KeyFileError(f"{what} {path} is empty")
    return value
