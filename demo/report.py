"""The demo's report: what went in, what was stored and sent, how the windows were used, and
the verdict. Store figures come from the Store's own reports, read-only once the daemon stopped;
the timeline comes from the daemon's log."""

from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.daemon.site_config import load_settings
from agent.errors import SkyferryError
from agent.format.layout import manifests_prefix
from agent.store.store import Store
from demo import CYCLE_CLOSED, CYCLE_OPEN, SITE, SPOOLS
from demo.files import DemoFile
from tests.kits.site import LogFollower, Site

# Uploads already running when a window ends may land just after it: not a violation.
CLOSE_GRACE_S = 0.5


@dataclass
class StoreStats:
    chunks: int = 0  # distinct chunks kept
    plain: int = 0  # plaintext bytes of the distinct chunks
    sealed: int = 0  # sealed (compressed + encrypted) bytes of the distinct chunks
    deduplicated: int = 0  # input bytes whose chunks were already stored
    manifests: int = 0  # sealed manifest bytes (as sent: the cloud's manifest folder)
    ok: bool = False


def store_stats(site: Site) -> StoreStats:
    """Chunk and byte counts from the store, opened read-only after the daemon stopped."""
    s = StoreStats()
    try:
        settings = load_settings(site.config)
        store = Store(settings.site.state_dir, settings.classes, read_only=True)
        try:
            counts = store.chunk_counts()
            compressed, s.deduplicated = store.savings()
        finally:
            store.close()
    except (SkyferryError, sqlite3.Error) as e:
        print(f"  (store statistics unavailable: {e})", file=sys.stderr)
        return s
    kept = [v for state, v in counts.items() if state != "corrupt"]
    s.chunks = sum(n for n, _ in kept)
    s.sealed = sum(b for _, b in kept)
    s.plain = s.sealed + compressed
    s.manifests = tree_bytes(site.cloud / manifests_prefix(SITE))[1]
    s.ok = True
    return s


def tree_bytes(root: Path) -> tuple[int, int]:
    """(files, bytes) below root."""
    sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["ts"])).timestamp()


def sent_while_closed(log: LogFollower, cloud: Path) -> int:
    """Cloud objects written while the schedule had the window closed (should be none)."""
    closed = [(_when(e) + CLOSE_GRACE_S, float(e["next_change"])) for e in log.events
              if e.get("event") == "gate_closed" and isinstance(e.get("next_change"), int | float)]
    return sum(1 for p in cloud.rglob("*") if p.is_file()
               and any(a <= p.stat().st_mtime < b for a, b in closed))


def second_window(log: LogFollower, files: list[DemoFile]) -> str | None:
    """How soon after the window reopened the alarms, and then the big frame, were in."""
    # The schedule's reopening time: the daemon logs gate changes on a 0.2 s tick, later.
    reopen_at = [float(e["next_change"]) for e in log.events if e.get("event") == "gate_closed"
                 and isinstance(e.get("next_change"), int | float)]
    if not reopen_at:
        return None
    reopen = reopen_at[0]
    wave2 = {(f.spool, f.name) for f in files if f.wave == 2}
    commit_at = {str(e.get("object")): _when(e) for e in log.events
                 if e.get("event") == "object_committed"}
    alarms: list[float] = []
    frame: list[float] = []
    for e in log.events:
        key = (str(e.get("source")), str(e.get("file")))
        t = commit_at.get(str(e.get("object")))
        if e.get("event") != "file_accepted" or key not in wave2 or t is None:
            continue
        if key[0] == "alarms":
            alarms.append(t)
        elif key[1].startswith("camera/"):
            frame.append(t)
    if not alarms:
        return None
    parts = [f"all {len(alarms)} alarms (critical) in the cloud "
             f"{max(alarms) - reopen:.1f}s after it opened"]
    if frame:
        parts.append(f"the 40 MiB camera frame (normal) {max(frame) - reopen:.1f}s after")
    return "; ".join(parts)


def ingest_rates(log: LogFollower, files: list[DemoFile], dropped_at: dict[int, float]) -> str:
    """Per wave: files and bytes accepted, and how fast, from the drop to the last acceptance."""
    wave_of = {(f.spool, f.name): f.wave for f in files}
    accepted: dict[int, list[tuple[float, int]]] = {}
    for e in log.events:
        wave = wave_of.get((str(e.get("source")), str(e.get("file"))))
        if e.get("event") == "file_accepted" and wave is not None:
            accepted.setdefault(wave, []).append((_when(e), int(e.get("bytes") or 0)))
    parts = []
    for wave, got in sorted(accepted.items()):
        took = max(t for t, _ in got) - dropped_at.get(wave, min(t for t, _ in got))
        nbytes = sum(n for _, n in got)
        rate = f"{size_text(nbytes / took)}/s, {len(got) / took:.0f} files/s" if took > 0 else "n/a"
        parts.append(f"wave {wave}: {len(got)} files, {size_text(nbytes)} in {took:.1f}s ({rate})")
    return "; ".join(parts)


@dataclass
class Timings:
    generate: float = 0.0
    sync: float = 0.0
    restore: float = 0.0
    total: float = 0.0


@dataclass
class Sync:
    """What the sync step leaves for the report: the daemon's log, and when each wave was in."""

    log: LogFollower
    dropped_at: dict[int, float]  # wave -> wall-clock time its files were in the spools


def report(files: list[DemoFile], stats: StoreStats, cloud: Path, sync: Sync,
           restore_json: dict[str, Any], problems: list[str], t: Timings) -> str:
    log = sync.log
    bytes_in = sum(f.size for f in files)
    per_spool = {s: sum(1 for f in files if f.spool == s) for s in SPOOLS}
    cloud_files, cloud_bytes = tree_bytes(cloud)
    lines = [
        "",
        "skyferry demo report",
        "--------------------",
        f"files in         {len(files)} ("
        + ", ".join(f"{n} {s}/{SPOOLS[s]}" for s, n in per_spool.items())
        + f"), {size_text(bytes_in)}",
    ]
    if stats.ok:
        stored = stats.sealed + stats.manifests
        lines += [
            f"bytes stored     {size_text(stored)} sealed ({size_text(stats.sealed)} in "
            f"{stats.chunks} chunks + {size_text(stats.manifests)} in signed manifests)",
            f"compression      {size_text(stats.plain)} of unique data sealed into "
            f"{size_text(stats.sealed)}: {_pct(stats.plain - stats.sealed, stats.plain)} saved",
            f"dedup            {size_text(stats.deduplicated)} of the input was already stored "
            f"(the same chunks): not stored or sent again",
        ]
    lines += [
        f"ingest           {ingest_rates(log, files, sync.dropped_at)}",
        f"bytes sent       {size_text(cloud_bytes)} in {cloud_files} cloud objects "
        f"({_pct(bytes_in - cloud_bytes, bytes_in)} less than the input)",
        f"windows used     {log.count('gate_open')} (cycle {CYCLE_OPEN} open, {CYCLE_CLOSED} "
        f"closed); {sent_while_closed(log, cloud)} objects sent while closed; "
        f"{log.count('upload_cut')} uploads cut by a closing window",
    ]
    reopened = second_window(log, files)
    if reopened:
        lines.append(f"second window    {reopened}")
    lines += [
        f"restore          {restore_json.get('objects_ok')} objects, "
        f"{size_text(int(restore_json.get('bytes_ok') or 0))}, "
        f"{len(restore_json.get('problems') or [])} problems reported",
        f"elapsed          {t.total:.1f}s (generate {t.generate:.1f}s, sync {t.sync:.1f}s, "
        f"restore + compare {t.restore:.1f}s)",
    ]
    warnings = log.problems()
    if warnings:
        lines.append(f"daemon warnings  {len(warnings)}, e.g. {warnings[0]}")
    lines.append("")
    if problems:
        lines.append(f"FAIL: {len(problems)} differences")
        lines += [f"  - {p}" for p in problems[:50]]
        if len(problems) > 50:
            lines.append(f"  ... and {len(problems) - 50} more")
    else:
        lines.append(f"PASS: all {len(files)} files restored byte-identical")
    return "\n".join(lines)
