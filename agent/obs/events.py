"""A tap on the log stream: delivery events for MQTT and the last problems for the status page.

The JSON log lines are skyferry's stable event interface (`event`, `object`, `class`, `bytes`,
...), so MQTT delivery events are derived from them rather than from hooks in every module:
one place maps log events to the four delivery states operators follow.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.obs.logs import safe_text

# Log event -> delivery state published on skyferry/<site>/events.
DELIVERY_EVENTS = {
    "file_accepted": "queued",
    "put_accepted": "queued",
    "mqtt_batch_accepted": "queued",
    "chunk_sent": "sent",
    "object_committed": "committed",
    "object_evicted": "evicted",
}
_FIELDS = ("object", "chunk", "class", "bytes", "source", "file", "messages", "reason")

Listener = Callable[[dict[str, Any]], None]


class EventTap(logging.Handler):
    """Keeps the last warnings and errors, and hands delivery events to listeners."""

    def __init__(self, keep: int = 20) -> None:
        super().__init__(level=logging.DEBUG)
        self.problems: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.listeners: list[Listener] = []
        self._guard = threading.Lock()  # records also come from executor threads

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "event", None)
            if record.levelno >= logging.WARNING:
                with self._guard:
                    self.problems.append({
                        "ts": _iso(record.created), "level": record.levelname.lower(),
                        # Names in it are outsiders' (a put's, a spool file's): the status
                        # page and MQTT need printable UTF-8.
                        "event": event or "", "msg": safe_text(record.getMessage()),
                    })
            state = DELIVERY_EVENTS.get(event or "")
            if state is None or (event == "file_accepted" and getattr(record, "duplicate", False)):
                return
            out: dict[str, Any] = {"event": state, "ts": _iso(record.created)}
            for k in _FIELDS:
                v = getattr(record, k, None)
                if v is not None:
                    out[k] = v
            for listener in list(self.listeners):
                listener(out)
        except Exception:  # a telemetry problem must never break the code that logged
            self.handleError(record)

    def recent_problems(self) -> list[dict[str, Any]]:
        with self._guard:
            return list(self.problems)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
