"""The [telemetry] section: log level and format, and where the metrics page listens."""

from __future__ import annotations

from typing import Literal, cast

from agent.config.settings import TelemetrySettings
from agent.config.table import Table

LogFormat = Literal["auto", "json", "text"]


def read_telemetry(root: Table) -> TelemetrySettings:
    t = root.table("telemetry", ("log_level", "log_format", "metrics_listen"))
    level = t.choice("log_level", ("debug", "info", "warning", "error"), "info")
    fmt = t.choice("log_format", ("auto", "json", "text"), "auto")
    listen = _listen_address(t, "metrics_listen")
    return TelemetrySettings(
        log_level=level, log_format=cast(LogFormat, fmt), metrics_listen=listen
    )


DEFAULT_METRICS_LISTEN = ("127.0.0.1", 9464)  # localhost only: the page shows queue contents


def _listen_address(t: Table, name: str) -> tuple[str, int] | None:
    text = t.string(name, None)
    if text is None:
        return DEFAULT_METRICS_LISTEN if not t.has(name) else None
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        t.report(name, "must be HOST:PORT or \"off\"", 'write e.g. "127.0.0.1:9464"')
        return None
    return host.strip("[]"), int(port)
