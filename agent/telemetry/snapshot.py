"""One picture of the agent, taken every second: what the status page, the MQTT status, the
sd_notify STATUS line and the service gauges all show, so they never disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.config.units import format_duration, format_size
from agent.obs.logs import iso
from agent.obs.metrics import Metrics
from agent.store.store import Store
from agent.uplink.gate import Gate

TIMELINE_S = 24 * 3600.0
MAX_TIMELINE = 200  # windows listed; a short test cycle would otherwise list thousands


@dataclass(frozen=True)
class ClassView:
    name: str
    queued_items: int
    queued_bytes: int
    committed_items: int
    oldest_queued_age_s: float | None
    items: dict[str, int]
    bytes: dict[str, int]


@dataclass(frozen=True)
class WindowView:
    start: float
    end: float | None  # None: open-ended ("always")
    rate_bps: float | None
    source: str


@dataclass(frozen=True)
class Snapshot:
    site: str
    time: float
    classes: tuple[ClassView, ...]
    gate_open: bool
    paused: bool
    flushing: bool
    link_up: bool
    window: WindowView | None
    next_change: float | None
    timeline: tuple[WindowView, ...]
    quota_used: int
    quota_limit: int | None
    throughput_bps: float
    mqtt: dict[str, Any] | None
    problems: tuple[dict[str, Any], ...] = ()
    # The last backend check (agent/uplink/backend_check.py): state ok, refused, unreachable or
    # unknown, the service's answer, and when; None when the daemon has no check.
    backend: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def queued_items(self) -> int:
        return sum(c.queued_items for c in self.classes)

    @property
    def queued_bytes(self) -> int:
        return sum(c.queued_bytes for c in self.classes)

    @property
    def gate_state(self) -> str:
        if self.paused:
            return "paused"
        if self.gate_open:
            return "flushing" if self.flushing else "open"
        if not self.link_up:
            return "closed (link down)"
        return "closed"

    def seconds_to_next(self) -> float | None:
        return None if self.next_change is None else max(0.0, self.next_change - self.time)

    def status_line(self) -> str:
        """The one-line STATUS for systemd: queue and gate."""
        per_class = " ".join(f"{c.name}={c.queued_items}" for c in self.classes if c.queued_items)
        nxt = self.seconds_to_next()
        when = "" if nxt is None else f", changes in {format_duration(nxt)}"
        refused = self.backend is not None and self.backend.get("state") == "refused"
        return (f"queue {self.queued_items} objects ({format_size(self.queued_bytes)})"
                + (f" [{per_class}]" if per_class else "")
                + f"; gate {self.gate_state}{when}; link {'up' if self.link_up else 'down'}"
                + ("; BACKEND REFUSED" if refused else ""))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["queued_items"] = self.queued_items
        data["queued_bytes"] = self.queued_bytes
        data["gate_state"] = self.gate_state
        data["time_iso"] = iso(self.time)
        data["next_change_iso"] = None if self.next_change is None else iso(self.next_change)
        return data


def collect_store(store: Store, now: float) -> tuple[ClassView, ...]:
    """The queue by class (blocking: call through the executor)."""
    out = []
    for name, s in store.summary(now).items():
        out.append(ClassView(
            name=name, queued_items=s.items.get("queued", 0),
            queued_bytes=s.bytes.get("queued", 0),
            committed_items=s.items.get("committed", 0),
            oldest_queued_age_s=s.oldest_queued_age_s, items=dict(s.items),
            bytes=dict(s.bytes)))
    return tuple(out)


def window_view(c: Any) -> WindowView:
    return WindowView(c.start, None if math.isinf(c.end) else c.end, c.rate_bps, c.source)


def gate_views(gate: Gate, now: float) -> tuple[WindowView | None, float | None,
                                               tuple[WindowView, ...]]:
    state = gate.state()
    window = None if state.window is None else window_view(state.window)
    contacts = gate.schedule.contacts(now, now + TIMELINE_S)[:MAX_TIMELINE]
    return window, state.next_change, tuple(window_view(c) for c in contacts)


def apply_to_metrics(snap: Snapshot, metrics: Metrics, budget: float | None) -> None:
    """Set the service gauges from a snapshot."""
    for c in snap.classes:
        for state in set(c.items) | {"queued"}:
            metrics.queue_items.labels(c.name, state).set(c.items.get(state, 0))
            metrics.queue_bytes.labels(c.name, state).set(c.bytes.get(state, 0))
        metrics.oldest_age.labels(c.name).set(c.oldest_queued_age_s or 0.0)
    metrics.window_open.set(1 if snap.window is not None else 0)
    nxt = snap.seconds_to_next()
    metrics.next_window.set(-1 if nxt is None else nxt)
    metrics.link_up.set(1 if snap.link_up else 0)
    metrics.gate_open.set(1 if snap.gate_open else 0)
    metrics.paused.set(1 if snap.paused else 0)
    metrics.quota_used.set(snap.quota_used)
    metrics.quota_limit.set(snap.quota_limit or 0)
    metrics.throughput.set(snap.throughput_bps)
    metrics.gate_budget.set(-1 if budget is None else budget)


def window_budget(window: WindowView | None, now: float) -> float | None:
    """Bytes the open window can still carry: seconds left x expected rate, when both known."""
    if window is None or window.end is None or window.rate_bps is None:
        return None
    return max(0.0, window.end - now) * window.rate_bps
