"""JSON lines on stdout for journald, readable text on a terminal; stable event keys."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.getMessage()),
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items()
            if k not in _STANDARD and k != "event"
        )
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{ts} {record.levelname.lower():7} {record.getMessage()}"
        return f"{line}  {extras}" if extras else line


def setup_logging(level: str, fmt: str) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.set_name("stdout")
    handler.setLevel(level.upper())
    root = logging.getLogger("skyferry")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # paho logs every packet at debug level: far too much for a journal, and costly.
    logging.getLogger("skyferry.mqtt.paho").setLevel(logging.WARNING)


def set_log_level(level: str) -> None:
    """Change what reaches stdout (SIGHUP); taps keep seeing everything they asked for."""
    root = logging.getLogger("skyferry")
    for h in root.handlers:
        if h.get_name() == "stdout":
            h.setLevel(level.upper())
    if not any(h.get_name() != "stdout" for h in root.handlers):
        root.setLevel(level.upper())


def attach_tap(handler: logging.Handler) -> None:
    """Add a handler that also sees debug events (delivery events), whatever goes to stdout."""
    root = logging.getLogger("skyferry")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)


def detach_tap(handler: logging.Handler) -> None:
    logging.getLogger("skyferry").removeHandler(handler)


def log_event(logger: logging.Logger, level: int, event: str, msg: str, **fields: Any) -> None:
    """Log with a stable `event` key and extra fields (object, chunk, class, bytes, ...)."""
    logger.log(level, msg, extra={"event": event, **fields})
