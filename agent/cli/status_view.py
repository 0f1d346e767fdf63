"""`skyferry status`: what the store and the schedule say, joined with what the running daemon
answers on its socket (paused, the gate as it is now, the queue, its other status fields).

`gate.window_open` is the schedule's fact (a window is scheduled now); `gate.state` and
`gate.open` say whether anything is being sent: never "open" for a daemon that is paused,
starting or not running.
"""

from __future__ import annotations

from typing import Any

NOT_RUNNING = "not running"


def with_daemon(data: dict[str, Any], reply: dict[str, Any] | None) -> dict[str, Any]:
    """`data` (status_data: store and schedule) with the daemon's answer folded in; `reply`
    is None when no daemon listens on the socket."""
    gate = data["gate"]
    if reply is None:
        data["daemon"] = {"running": False}
        gate.update(state=NOT_RUNNING, open=False, paused=None)
        return data
    if not reply.get("ok"):
        data["daemon"] = {"running": None if reply.get("unreachable") else True,
                          "error": str(reply.get("error"))}
        gate.update(state="unknown", open=None, paused=None)
        return data
    live: dict[str, Any] = reply.get("status") or {}
    snap: dict[str, Any] | None = live.get("snapshot")
    data["daemon"] = {"running": True, "pid": live.get("pid"), "starting": snap is None}
    if snap is None:
        gate.update(state="starting", open=False, paused=None)
        return data
    gate.update(state=snap["gate_state"], open=snap["gate_open"], paused=snap["paused"],
                flushing=snap["flushing"], link_up=snap["link_up"])
    data["classes"] = {
        c["name"]: {"items": c["items"], "bytes": c["bytes"],
                    "oldest_queued_age_s": c["oldest_queued_age_s"]}
        for c in snap["classes"]}
    data["queued_objects"] = snap["queued_items"]
    data["queued_bytes"] = snap["queued_bytes"]
    backend = snap.get("backend", (snap.get("extra") or {}).get("backend"))
    if backend is not None:
        data["backend"] = backend
    data["daemon"]["as_of"] = snap.get("time_iso")
    # Everything else the daemon's snapshot holds (MQTT, quota, link, last problems...).
    data["daemon"]["snapshot"] = {k: v for k, v in snap.items()
                                  if k not in ("classes", "timeline")}
    return data


def daemon_lines(data: dict[str, Any]) -> list[str]:
    """The text lines about the daemon, the gate and the backend."""
    d = data.get("daemon") or {}
    g = data["gate"]
    if d.get("running") is None:
        head = f"daemon: unknown: {d.get('error')}; the queue is read from the store"
    elif not d.get("running"):
        head = ("daemon: not running; the queue is read from the store, and nothing is sent "
                "until the daemon starts")
    elif d.get("error"):
        head = f"daemon: running, but its status answer was refused: {d['error']}"
    elif d.get("starting"):
        head = f"daemon: starting (pid {d.get('pid')})"
    else:
        head = f"daemon: running (pid {d.get('pid')})"
    state = g.get("state") or "unknown"
    if state == NOT_RUNNING:
        state = "closed (daemon not running)"
    elif state == "starting":
        state = "closed (daemon starting)"
    end = f", until {g['window_end']}" if g.get("window_end") else ""
    scheduled = f"a window is scheduled now{end}" if g["window_open"] else "no window now"
    out = [head, f"gate: {state} (mode {g['mode']}); schedule: {scheduled}, next change "
                 f"{g['next_change'] or 'never'}"]
    if "backend" in data:
        out.append(f"backend: {backend_text(data['backend'])}")
    mqtt = (d.get("snapshot") or {}).get("mqtt")
    if mqtt:
        up = mqtt.get("connected") if mqtt.get("ingest") else mqtt.get("status_connected")
        out.append(f"mqtt: {'connected' if up else 'disconnected'}, "
                   f"{mqtt.get('pending', 0)} messages pending")
    return out


def backend_text(backend: Any) -> str:
    """A backend check as one phrase: "ok", or "refused: <reason>"."""
    if not isinstance(backend, dict):
        return str(backend)
    state = backend.get("state")
    if state is None:
        state = "ok" if backend.get("ok") else "refused"
    reason = backend.get("reason") or backend.get("detail") or backend.get("error")
    return f"{state}: {reason}" if reason else str(state)
