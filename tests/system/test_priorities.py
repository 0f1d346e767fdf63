"""Core acceptance 5 and 6: windows gate uploads, urgent data goes first, quota refuses cleanly."""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.format.layout import chunk_key
from tests.kits.site import Site, drop_file, free_port, wait_for

SMALL_CHUNKS = {"min_size": "256KiB", "avg_size": "1MiB", "max_size": "2MiB"}


def window_from_now(delay_s: float, length_s: float = 3600) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(seconds=delay_s)
    return {"mode": "schedule", "intervals": [
        {"start": start.isoformat(), "end": (start + timedelta(seconds=length_s)).isoformat()}
    ]}, start.timestamp()


def committed_events(site: Site) -> list[dict[str, Any]]:
    return [e for e in site.log_events() if e.get("event") == "object_committed"]


def test_closed_window_sends_nothing_then_drains_by_class(make_site: Callable[..., Site]) -> None:
    # Room for a daemon start and a scan on a machine busy with the rest of the suite.
    windows, opens_at = window_from_now(15)
    site = make_site(spools={"bulk": "bulk", "norm": "normal", "crit": "critical"},
                     extra={"windows": windows, "uplink": {"streams": 1, "rate": "1MB/s"}})
    rng = random.Random(5)
    for spool in ("bulk", "norm", "crit"):  # least urgent dropped first: oldest
        for i in range(4):
            drop_file(site.spool(spool), f"{spool}-{i}.bin", rng.randbytes(rng.randint(1, 300_000)))
        time.sleep(0.05)
    site.start()
    wait_for(lambda: not site.spool_files(), 20, "all files accepted", site)
    time.sleep(1.0)
    assert time.time() < opens_at, "test too slow: the window opened before the check"
    assert [p for p in site.cloud.rglob("*") if p.is_file()] == [], "sent while window closed"
    assert not committed_events(site)

    site.wait_drained(timeout=60, expect_objects=12)
    site.stop()
    events = committed_events(site)
    assert events[0]["ts"] >= datetime.fromtimestamp(opens_at, UTC).isoformat()[:19]
    # The four small files of each spool travel as one pack (or a few): whole classes in turn.
    # Two workers send (streams = 1, plus the one kept for critical). Commits, and the
    # acknowledgements logged after a read-back that runs beside the next upload, may swap
    # by milliseconds (seen: normal committed 3 ms before critical; a bulk chunk acknowledged
    # 1 ms before the normal one). What the queue promises is the order work is taken in, and
    # one worker's chunks reach the cloud in the order it took them. Only the general worker
    # takes normal and bulk work: its normal chunk arrives before any bulk chunk. It takes the
    # normal chunk only once both critical chunks are taken (the kept worker holds one at a
    # time), so a critical chunk arrives first. At 1 MB/s each chunk waits ~0.3 s for the
    # shared token bucket: arrivals are far apart, whatever the file times' granularity.
    cls = {e["object"]: e["class"] for e in events}
    assert set(cls.values()) == {"critical", "normal", "bulk"}, events
    sent = [e for e in site.log_events() if e.get("event") == "chunk_sent"]
    assert sum(cls[e["object"]] == "critical" for e in sent) >= 2, "the order below needs 2"
    arrived = sorted(((site.cloud / chunk_key(site.site_id, e["chunk"])).stat().st_mtime_ns,
                      cls[e["object"]]) for e in sent)
    firsts = list(dict.fromkeys(c for _, c in arrived))
    assert firsts == ["critical", "normal", "bulk"], arrived


def test_critical_overtakes_a_large_bulk_upload(make_site: Callable[..., Site],
                                                tmp_path: Path) -> None:
    site = make_site(spools={"bulk": "bulk", "alarms": "critical"},
                     extra={"chunking": SMALL_CHUNKS,
                            "uplink": {"streams": 2, "rate": "16MB/s"}})
    big = random.Random(1).randbytes(64 << 20)  # ~4 s at 16 MB/s
    drop_file(site.spool("bulk"), "survey.bin", big)
    site.start()

    def bulk_sending() -> bool:
        return any(e.get("event") == "chunk_sent" for e in site.log_events())

    wait_for(bulk_sending, 30, "the bulk upload to start", site)
    drop_file(site.spool("alarms"), "fire.json", b'{"alarm": "fire", "zone": 3}')
    site.wait_drained(timeout=60, expect_objects=2)
    site.stop()
    events = committed_events(site)
    assert [e["class"] for e in events] == ["critical", "bulk"], events
    out = tmp_path / "out"
    assert json.loads(site.restore(out).stdout)["objects_ok"] == 2
    assert (out / site.site_id / "bulk" / "survey.bin").read_bytes() == big


def metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_quota_refuse_leaves_files_then_resumes(make_site: Callable[..., Site],
                                                tmp_path: Path) -> None:
    windows, opens_at = window_from_now(8)
    port = free_port()
    site = make_site(extra={
        "windows": windows,
        "store": {"quota": "3MiB"},
        "classes": {"critical": {"rank": 0, "policy": "refuse"},
                    "normal": {"rank": 1, "policy": "refuse"}},
        "telemetry": {"metrics_listen": f"127.0.0.1:{port}"},
    })
    rng = random.Random(3)
    files = {f"f{i}.bin": rng.randbytes(1 << 20) for i in range(6)}
    for name, data in files.items():
        drop_file(site.spool(), name, data)
    site.start()

    def refused() -> bool:
        return any(e.get("event") == "ingest_refused" for e in site.log_events())

    wait_for(refused, 20, "a quota refusal", site)
    time.sleep(0.5)
    assert time.time() < opens_at, "test too slow: the window opened before the check"
    left = {p.name for p in site.spool_files()}
    assert len(left) == 4, f"expected 2 accepted and 4 left in the spool, found {left}"
    line = next(e for e in site.log_events() if e.get("event") == "ingest_refused")
    assert "quota" in line["msg"] and "stays in place" in line["msg"], line
    assert metric(port, "skyferry_quota_refusals_total") >= 1
    assert metric(port, "skyferry_quota_used_bytes") <= 3 << 20

    site.wait_drained(timeout=60, expect_objects=6)  # resumes by itself once space frees
    site.stop()
    out = tmp_path / "out"
    assert json.loads(site.restore(out).stdout)["objects_ok"] == 6
    for name, data in files.items():
        assert (out / site.site_id / "files" / name).read_bytes() == data
