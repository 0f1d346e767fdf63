"""`skyferry status` asks the running daemon, and says when it is paused or not running."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.daemon.site_config import load_settings
from agent.daemon.wiring import Daemon
from tests.kits.site import PYTHON, Site


def gate_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("gate:"))


def test_status_without_a_daemon_says_not_running_never_open(
        make_site: Callable[..., Site], tmp_path: Path) -> None:
    site = make_site()  # mode "always": the schedule has a window now
    f = tmp_path / "queued.txt"
    f.write_bytes(b"waiting for the daemon")
    site.cli("put", "-c", str(site.config), str(f))
    text = site.cli("status", "-c", str(site.config)).stdout
    assert "daemon: not running" in text
    assert gate_line(text).startswith("gate: closed (daemon not running)")
    assert "window open" not in text and "gate: open" not in text
    data = site.status()
    assert data["daemon"] == {"running": False}
    assert data["gate"]["state"] == "not running" and data["gate"]["open"] is False
    assert data["queued_objects"] == 1  # read from the store, as before


async def _cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "agent", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def _status(site: Site) -> tuple[str, dict[str, Any]]:
    text = await _cli("status", "-c", str(site.config))
    data: dict[str, Any] = json.loads(await _cli("status", "-c", str(site.config), "--json"))
    return text, data


async def test_status_of_a_paused_daemon_says_paused(make_site: Callable[..., Site],
                                                     tmp_path: Path) -> None:
    site = make_site()
    daemon = Daemon(load_settings(site.config))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        for _ in range(600):
            if daemon.service.snapshot is not None and daemon.settings.put.socket.exists():
                break
            await asyncio.sleep(0.05)
        text, data = await _status(site)
        assert gate_line(text).startswith("gate: open")
        assert f"daemon: running (pid {os.getpid()})" in text
        assert data["gate"]["state"] == "open" and data["gate"]["paused"] is False

        daemon.gate.set_paused(True)  # what the operator's `pause` command does
        text, data = await _status(site)
        assert gate_line(text).startswith("gate: paused"), text
        assert "window open" not in text and "gate: open" not in text
        assert data["gate"]["state"] == "paused"
        assert data["gate"]["open"] is False and data["gate"]["paused"] is True
        assert data["gate"]["window_open"] is True  # the schedule's fact, kept apart
        assert data["daemon"]["running"] is True and data["daemon"]["pid"] == os.getpid()

        f = tmp_path / "while-paused.txt"
        f.write_bytes(b"queued, not sent")
        await _cli("put", "-c", str(site.config), str(f))
        _, data = await _status(site)
        assert data["queued_objects"] == 1  # the queue as the daemon has it now
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def test_a_backend_state_in_the_daemons_snapshot_is_shown() -> None:
    """The daemon's snapshot may carry its backend check (ok, or refused with the reason)."""
    from agent.cli.status_view import daemon_lines, with_daemon

    gate = {"mode": "always", "window_open": True, "window_end": None, "next_change": None}
    snap = {"gate_state": "open", "gate_open": True, "paused": False, "flushing": False,
            "link_up": True, "classes": [], "queued_items": 0, "queued_bytes": 0,
            "time_iso": "2026-12-05T07:00:00+00:00", "mqtt": None,
            "backend": {"state": "refused", "reason": "403 AuthorizationFailure",
                        "checked_at": "2026-12-05T07:00:00+00:00"}}
    data = with_daemon({"gate": dict(gate), "classes": {}},
                       {"ok": True, "status": {"pid": 42, "snapshot": snap}})
    assert data["backend"]["state"] == "refused"
    assert "backend: refused: 403 AuthorizationFailure" in daemon_lines(data)
    assert "gate: open (mode always)" in daemon_lines(data)[1]
    del snap["backend"]
    data = with_daemon({"gate": dict(gate), "classes": {}},
                       {"ok": True, "status": {"pid": 42, "snapshot": snap}})
    assert "backend" not in data and not any(
        line.startswith("backend:") for line in daemon_lines(data))
