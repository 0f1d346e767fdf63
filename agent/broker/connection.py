"""What both MQTT connections (messages in, status and commands) need to log in: the password
a SecretRef points at, and the TLS context of [mqtt.tls]."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path

from agent.config.settings import MqttSettings, SecretRef
from agent.errors import SourceError


def read_secret(ref: SecretRef, environ: Mapping[str, str]) -> str:
    """The secret a SecretRef points at: a file's first line, or an environment variable."""
    if ref.source == "env":
        value = environ.get(ref.where)
        if value is None:
            raise SourceError(f"environment variable {ref.where} (the MQTT password) is not "
                              "set; set it in the unit's environment or use password_file")
        return value
    path = Path(ref.where)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as e:
        raise SourceError(f"cannot read the MQTT password file {path}: {e.strerror}") from None
    if mode & 0o077:
        raise SourceError(f"{path} (the MQTT password) is readable by other users; "
                          f"chmod 600 {path}")
    return text.splitlines()[0] if text else ""


def tls_context(s: MqttSettings) -> ssl.SSLContext | None:
    """An SSL context from [mqtt.tls], or None for plain TCP."""
    if s.tls is None:
        return None
    ctx = ssl.create_default_context(
        cafile=str(s.tls.ca_file) if s.tls.ca_file else None)
    if s.tls.cert_file and s.tls.key_file:
        ctx.load_cert_chain(str(s.tls.cert_file), str(s.tls.key_file))
    if s.tls.insecure:
        ctx.check_hostname = False
    return ctx
