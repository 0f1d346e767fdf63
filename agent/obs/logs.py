"""JSON lines on stdout for journald, readable text on a terminal; stable event keys.

Log lines carry names that outsiders choose (spool file names, MQTT topics, put names). Both
formatters make such text harmless here, once, for every caller: in text lines control
characters (C0, DEL, C1, line and paragraph separators) are shown as escapes, so a name can
neither start a forged line nor send a terminal escape sequence; JSON lines are always valid
UTF-8 (bytes of non-UTF-8 names, carried as surrogate escapes, are shown as `\\xNN`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

# Lone surrogates: the undecodable bytes of a name read with `surrogateescape` (or junk).
_SURROGATE = "\ud800-\udfff"
_UNSAFE_TEXT = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_SURROGATE}]")
# json.dumps escapes C0 and quotes itself; with ensure_ascii=False it leaves these raw.
_UNSAFE_JSON = re.compile(f"[\x7f-\x9f\u2028\u2029{_SURROGATE}]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _surrogate_text(c: int) -> str:
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}"


def _text_escape(m: re.Match[str]) -> str:
    ch = m.group()
    c = ord(ch)
    if ch in _SHORT:
        return _SHORT[ch]
    if 0xD800 <= c <= 0xDFFF:
        return _surrogate_text(c)
    return f"\\x{c:02x}" if c <= 0xFF else f"\\u{c:04x}"


def _json_escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    if 0xD800 <= c <= 0xDFFF:
        # Inside a JSON string: an escaped backslash, so the value reads `\xNN`.
        return "\\" + _surrogate_text(c)
    return f"\\u{c:04x}"  # a JSON escape: the value is unchanged, the line stays printable


def iso(t: float) -> str:
    """A timestamp as operators read it in the status, MQTT answers and the backend check."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def safe_text(value: object) -> str:
    """`value` as one line of printable text: control characters and undecodable bytes are
    shown as backslash escapes."""
    return _UNSAFE_TEXT.sub(_text_escape, str(value))


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
        return _UNSAFE_JSON.sub(_json_escape, json.dumps(out, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{safe_text(k)}={safe_text(v)}" for k, v in record.__dict__.items()
            if k not in _STANDARD and k != "event"
        )
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{ts} {record.levelname.lower():7} {safe_text(record.getMessage())}"
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


class Throttled:
    """One event that outsiders can repeat at will (a flood of idle connections): logged the
    first `burst` times, then at most `burst` times per `every_s` with how many were not
    logged meanwhile."""

    def __init__(self, every_s: float = 10.0, burst: int = 1) -> None:
        self.every_s = every_s
        self.burst = burst
        self._since = float("-inf")  # start of the current period
        self._logged = 0  # lines in it
        self._skipped = 0
        self._lock = threading.Lock()  # the HTTP server logs from its request threads

    def log(self, logger: logging.Logger, level: int, event: str, msg: str,
            **fields: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._since >= self.every_s:
                self._since, self._logged = now, 0
            if self._logged >= self.burst:
                self._skipped += 1
                return
            self._logged += 1
            skipped, self._skipped = self._skipped, 0
        if skipped:
            msg = f"{msg} ({skipped} more like it not logged in the last {self.every_s:g}s)"
        log_event(logger, level, event, msg, suppressed=skipped, **fields)
