"""What both MQTT connections (messages in, status and commands) need to log in: the password
a SecretRef points at, and the TLS context of [mqtt.tls]."""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from agent.config import secrets
from agent.config.settings import MqttSettings, SecretRef
from agent.errors import KeyFileError, SourceError


def read_secret(ref: SecretRef, environ: Mapping[str, str]) -> str:
    """The MQTT password a SecretRef points at: a variable, or a private file's first line."""
    try:
        return secrets.read_secret(ref, environ, "MQTT password", first_line=True,
                                   allow_empty=True)
    except KeyFileError as e:
        raise SourceError(str(e)) from None


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
