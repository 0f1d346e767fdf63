"""The product side of benchmarks/ingest.py: skyferry as its users run it.

- **run + spool**: the corpus hard-linked into a spool folder before `skyferry run` starts
  (windows closed, so nothing is uploaded meanwhile; `[compression] level = 1`; `settle = "0s"`:
  the files are complete before the daemon starts, settling is about producers still writing).
  Timed from the start of the process until it has exited after SIGTERM, which is sent once the
  daemon has logged every file accepted (deleted from the spool): the whole process, its start-up
  and shutdown included. CPU and peak RSS of the daemon from GNU time.
- **put**: a daemon is started (not timed) with no spool, then `skyferry put CORPUS` is timed,
  the command a user runs: it returns once every file is durable. The put process's CPU and RSS
  come from GNU time; the daemon's CPU during the put from /proc/PID/stat, its peak RSS (VmHWM)
  from /proc/PID/status.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TICK_S = 0.02  # how often the log is read for progress


@dataclass(frozen=True)
class ProductRun:
    wall_s: float  # whole process (run: start to exit; put: the put command)
    cpu_s: float  # the process timed (run: the daemon; put: the put command)
    rss: int  # peak resident bytes of that process
    out_bytes: int  # sealed chunk and manifest bytes added to the store
    info: dict[str, Any] = field(default_factory=dict)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _closed_windows() -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(days=1)
    return {"mode": "schedule", "intervals": [
        {"start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat()}]}


def write_config(root: Path, keys: Path, site: str, spools: dict[str, Path],
                 extra: dict[str, Any] | None = None) -> Path:
    """A site config under root: the bench's keys, a folder backend, windows closed."""
    from tests.kits.site import free_port, render_toml

    data: dict[str, Any] = {
        "site": {"id": site, "state_dir": str(root / "state")},
        "keys": {"recipient_public": str(keys / "recipient.pub"),
                 "signing_key": str(keys / "site.key"), "dedup_key": str(keys / "dedup.key")},
        "backend": {"url": f"file://{root / 'cloud'}"},
        "compression": {"level": 1},
        "windows": _closed_windows(),
        "put": {"socket": str(root / "put.sock"), "priority": "bulk"},
        "telemetry": {"log_format": "json", "log_level": "info",
                      "metrics_listen": f"127.0.0.1:{free_port()}"},
    }
    if spools:
        data["spool"] = [{"name": n, "path": str(p), "priority": "bulk", "settle": "0s",
                          "scan_interval": "0.5s"} for n, p in spools.items()]
    for k, v in (extra or {}).items():
        data[k] = {**data.get(k, {}), **v}
    (root / "cloud").mkdir(parents=True, exist_ok=True)
    cfg = root / "skyferry.toml"
    cfg.write_text(render_toml(data))
    return cfg


def link_tree(src: Path, dest: Path) -> int:
    """Hard-link every regular file below src into dest (the spool); returns how many."""
    n = 0
    for dirpath, _, names in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in names:
            if not name.startswith("."):
                os.link(Path(dirpath) / name, dest / rel / name)
                n += 1
    return n


def sealed_bytes(state: Path) -> int:
    return sum(p.stat().st_size for sub in ("chunks", "manifests")
               for p in (state / sub).rglob("*") if p.is_file())


class _Log:
    """Counts `file_accepted` events as the daemon's JSON log grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.partial, self.accepted = path, b"", 0
        self.offset = path.stat().st_size if path.exists() else 0  # an earlier run's lines

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        self.accepted += sum(1 for raw in lines if b'"file_accepted"' in raw)


class Daemon:
    """`skyferry run` under GNU time (when installed), its log in a file."""

    def __init__(self, cfg: Path, log: Path) -> None:
        self.cfg, self.log = cfg, log
        self.stats = Path(tempfile.mkstemp(prefix="skyferry-bench-")[1])
        gnu_time = shutil.which("time", path="/usr/bin:/bin")
        cmd = [sys.executable, "-m", "agent", "run", "-c", str(cfg)]
        self.timed = bool(gnu_time)
        full = [gnu_time, "-f", "%U %S %M", "-o", str(self.stats), *cmd] if gnu_time else cmd
        with open(log, "ab") as out:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=_env())
        self.pid = self._daemon_pid()

    def _daemon_pid(self) -> int:
        if not self.timed:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with_pid = children.read_text().split() if children.exists() else []
            if with_pid:
                return int(with_pid[0])
            self.check()
            time.sleep(0.001)
        raise RuntimeError("the daemon did not start under GNU time")

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"skyferry run exited {self.proc.returncode}:\n" + "\n".join(tail))

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def hwm(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def wait_socket(self, timeout: float = 60) -> None:
        from agent.sources.put_client import request_status

        sock = self.cfg.parent / "put.sock"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if sock.exists() and request_status(sock) is not None:
                return
            time.sleep(0.05)
        raise RuntimeError("the daemon's socket did not answer")

    def stop(self) -> tuple[float, float, int]:
        """SIGTERM, wait: (seconds since start, CPU s, peak RSS bytes)."""
        os.kill(self.pid, signal.SIGTERM)
        rc = self.proc.wait(120)
        wall = time.monotonic() - self.started
        try:
            if rc != 0:
                raise RuntimeError(f"skyferry run exited {rc} after SIGTERM; see {self.log}")
            if self.timed:
                user, system, rss_kib = self.stats.read_text().split()[-3:]
                return wall, float(user) + float(system), int(rss_kib) * 1024
            return wall, 0.0, 0
        finally:
            self.stats.unlink(missing_ok=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.stats.unlink(missing_ok=True)


def run_spool(corpus: Path, root: Path, keys: Path, site: str, source: str = "corpus",
              extra: dict[str, Any] | None = None) -> ProductRun:
    """`skyferry run` with the corpus hard-linked into a spool named `source`, on the store
    under root (fresh, or the one an earlier run left: the re-send after an edit)."""
    root.mkdir(parents=True, exist_ok=True)
    spool = root / "spool" / source
    files = link_tree(corpus, spool)
    before = sealed_bytes(root / "state") if (root / "state").exists() else 0
    cfg = write_config(root, keys, site, {source: spool}, extra)
    os.sync()
    log = _Log(root / "daemon.log")
    daemon = Daemon(cfg, log.path)
    try:
        while log.accepted < files:
            daemon.check()
            time.sleep(TICK_S)
            log.poll()
        ingested = time.monotonic() - daemon.started
        hwm = daemon.hwm()
        wall, cpu, rss = daemon.stop()
    finally:
        daemon.kill()
    return ProductRun(wall, cpu, rss or hwm, sealed_bytes(root / "state") - before,
                      {"files": files, "ingested_s": round(ingested, 3), "vmhwm": hwm})


def run_put(corpus: Path, root: Path, keys: Path, site: str) -> ProductRun:
    """`skyferry put CORPUS` to a running daemon (started first, not timed)."""
    from benchmarks.ingest import measure

    root.mkdir(parents=True, exist_ok=True)
    cfg = write_config(root, keys, site, {})
    daemon = Daemon(cfg, root / "daemon.log")
    try:
        daemon.wait_socket()
        cpu0 = daemon.cpu_s()
        wall, cpu, rss, out = measure([sys.executable, "-m", "agent", "put", "-c", str(cfg),
                                       "--no-progress", str(corpus)], _env())
        daemon_cpu = daemon.cpu_s() - cpu0
        hwm = daemon.hwm()
        daemon.stop()
    finally:
        daemon.kill()
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    return ProductRun(wall, cpu, rss, sealed_bytes(root / "state"),
                      {"daemon_cpu_s": round(daemon_cpu, 2), "daemon_vmhwm": hwm,
                       "summary": summary})
