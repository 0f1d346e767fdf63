"""Backend secrets are read when the backend is opened, never kept in the settings."""

from __future__ import annotations

from collections.abc import Mapping

from agent.config import secrets
from agent.config.settings import SecretRef
from agent.errors import KeyFileError, PermanentBackendError


def read_secret(ref: SecretRef, env: Mapping[str, str], what: str) -> str:
    """The secret's value (agent/config/secrets.py); a problem is a permanent config error."""
    try:
        return secrets.read_secret(ref, env, what)
    except KeyFileError as e:
        raise PermanentBackendError(str(e), "config") from None
