"""A throw-away edge site: keys, config, spool folders, a daemon subprocess, its log, restore.

The one site harness: the system tests, the benchmarks and `make demo` (demo/) drive a site
through it; tests/kits/windows.py builds its in-process daemons from the same config tables.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.format.keys import GeneratedKeys, generate_keys

PYTHON = sys.executable


class CommandFailed(AssertionError):
    """A `skyferry` command the harness ran exited non-zero (its output is the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout: float, what: str, site: Site) -> float:
    """Poll until cond() holds, failing early if the daemon died; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        if site.proc is not None and site.proc.poll() is not None:
            raise AssertionError(f"daemon exited {site.proc.returncode}:\n{site.log_tail()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{site.log_tail()}")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def render_toml(data: dict[str, Any]) -> str:
    """Tiny TOML writer for test configs: tables, arrays of tables, [classes.X], inline values."""
    lines: list[str] = []
    for table, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{table}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        elif table == "classes":
            for name, cls in body.items():
                lines.append(f"[classes.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in cls.items()]
        else:
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def site_tables(root: Path, site_id: str, keys: GeneratedKeys,
                backend: dict[str, Any]) -> dict[str, Any]:
    """The [site], [keys] and [backend] tables of a site kept under `root`."""
    return {
        "site": {"id": site_id, "state_dir": str(root / "state")},
        "keys": {
            "recipient_public": str(keys.edge_dir / "recipient.pub"),
            "signing_key": str(keys.edge_dir / "site.key"),
            "dedup_key": str(keys.edge_dir / "dedup.key"),
        },
        "backend": backend,
    }


@dataclass
class Site:
    root: Path
    site_id: str = "test-site"
    spools: dict[str, str] = field(default_factory=lambda: {"files": "normal"})
    extra: dict[str, Any] = field(default_factory=dict)
    # The [backend] table (url, endpoint, credentials...); None: a file:// folder in root.
    backend: dict[str, Any] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.metrics_port = free_port()
        self.keys = generate_keys(self.root / "keys", self.site_id)
        self.cloud = self.root / "cloud"
        self.cloud.mkdir(parents=True, exist_ok=True)
        self.state = self.root / "state"
        self.log_path = self.root / "daemon.log"
        self.write_config()

    @property
    def config(self) -> Path:
        return self.root / "skyferry.toml"

    @property
    def backend_url(self) -> str:
        return str(self.backend["url"]) if self.backend else f"file://{self.cloud}"

    def backend_args(self) -> list[str]:
        """restore/verify options naming this site's backend (and its credentials)."""
        args = ["--backend", self.backend_url]
        return [*args, "--backend-config", str(self.config)] if self.backend else args

    def cloud_objects(self) -> dict[str, int]:
        """key -> size of every object in this site's backend, whatever its kind."""
        import asyncio

        from agent.backends.config import load_backend_settings
        from agent.backends.registry import open_backend

        backend = open_backend(load_backend_settings(self.config))

        async def listing() -> dict[str, int]:
            return {i.key: i.size async for i in backend.list("")}

        return asyncio.run(listing())

    @property
    def recipient_key(self) -> Path:
        return self.keys.cloud_dir / "recipient.key"

    def spool(self, name: str = "files") -> Path:
        return self.root / "spool" / name

    def write_config(self) -> None:
        backend = dict(self.backend) if self.backend else {"url": self.backend_url}
        data: dict[str, Any] = {
            **site_tables(self.root, self.site_id, self.keys, backend),
            "spool": [
                {"name": n, "path": str(self.spool(n)), "priority": p, "settle": "0.3s",
                 "scan_interval": "0.2s"}
                for n, p in self.spools.items()
            ],
            # Own metrics port per site: several daemons run at once in the suite.
            "telemetry": {"log_format": "json", "log_level": "debug",
                          "metrics_listen": f"127.0.0.1:{self.metrics_port}"},
        }
        for k, v in self.extra.items():
            if isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
        for n in self.spools:
            self.spool(n).mkdir(parents=True, exist_ok=True)
        self.config.write_text(render_toml(data))

    def cli(self, *args: str, check: bool = True, timeout: float = 300,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([PYTHON, "-m", "agent", *args], capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise CommandFailed(f"skyferry {' '.join(args)} exited {r.returncode}:\n"
                                f"{r.stdout}\n{r.stderr}")
        return r

    def start(self, wrap: tuple[str, ...] = ()) -> None:
        """Start the daemon; `wrap` prefixes the command (e.g. `ip netns exec NS`)."""
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 - the daemon owns it
        self.proc = subprocess.Popen([*wrap, PYTHON, "-m", "agent", "run", "-c", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.cli("status", "-c", str(self.config),
                                                  "--json").stdout)
        return out

    def store_status(self) -> dict[str, Any] | None:
        """What `skyferry status --json` says of the store and the gate, read in this process
        (cheap enough to poll); None while the daemon has not created its store yet."""
        from agent.cli.status import status_data
        from agent.daemon.site_config import load_settings
        from agent.errors import SkyferryError

        if not self.state.joinpath("index.sqlite").exists():
            return None
        try:
            return status_data(load_settings(self.config), time.time())
        except (SkyferryError, sqlite3.Error):
            return None  # caught mid-creation: ask again next time

    def spool_files(self) -> list[Path]:
        """Files still waiting in the spools (not the done/ folders)."""
        return [p for n in self.spools for p in self.spool(n).rglob("*")
                if p.is_file() and "done" not in p.relative_to(self.spool(n)).parts[:1]]

    def wait_drained(self, timeout: float = 120, expect_objects: int | None = None) -> None:
        """Until the spools are empty and nothing is queued (and, optionally, N committed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_tail()}")
            if not self.spool_files() and self.state.joinpath("index.sqlite").exists():
                st = self.status()
                committed = sum(c["items"].get("committed", 0) for c in st["classes"].values())
                if st["queued_objects"] == 0 and (
                        expect_objects is None or committed >= expect_objects):
                    return
            time.sleep(0.3)
        raise AssertionError(f"queue did not drain in {timeout}s:\n{self.log_tail()}")

    def log_events(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def restore(self, to: Path, *extra: str, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        return self.cli("restore", *self.backend_args(), "--key",
                        str(self.recipient_key), "--to", str(to), "--json", *extra, check=check)

    def verify(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("verify", *self.backend_args(), "--key",
                        str(self.recipient_key), "--json", *extra, check=check)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class LogFollower:
    """Reads a daemon's JSON log as it grows: the events so far and the gate as last logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.events: list[dict[str, Any]] = []
        self.gate_open: bool | None = None

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            self.events.append(event)
            if event.get("event") in ("gate_open", "gate_closed"):
                self.gate_open = event["event"] == "gate_open"

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e.get("event") == name)

    def problems(self) -> list[str]:
        """The messages of every warning and error logged so far."""
        return [str(e.get("msg")) for e in self.events
                if e.get("level") in ("warning", "error", "critical")]


def drop_file(spool: Path, name: str, data: bytes, mtime_ns: int | None = None) -> Path:
    """Write like a well-behaved producer: temporary name, then rename into place."""
    dest = spool / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, dest)
    return dest


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """name -> (size, blake3) for every file below root, but the restore journal (restore's
    own record in the target, agent/cloud/history.py)."""
    import blake3

    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).parts[0] != ".skyferry":
            h = blake3.blake3()
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            out[p.relative_to(root).as_posix()] = (p.stat().st_size, h.hexdigest())
    return out
