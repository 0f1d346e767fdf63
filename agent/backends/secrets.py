"""Backend secrets are read when the backend is opened, never kept in the settings."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path

from agent.config.settings import SecretRef
from agent.errors import PermanentBackendError


def read_secret(ref: SecretRef, env: Mapping[str, str], what: str) -> str:
    """The secret's value, from its file (private, like a key file) or environment variable."""
    if ref.source == "env":
        value = env.get(ref.where)
        if not value:
            raise PermanentBackendError(
                f"{what}: environment variable {ref.where} is not set (or empty); set it in the "
                "service's environment (systemd: EnvironmentFile=)", "config")
        return value.strip()
    path = Path(ref.where)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermanentBackendError(
                f"{what}: {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}", "config")
        value = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise PermanentBackendError(f"{what}: cannot read {path}: {e.strerror}",
                                    "config") from None
    if not value:
        raise PermanentBackendError(f"{what}: {path} is empty", "config")
    return value
