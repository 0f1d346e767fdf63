# ruff: noqa: F811  (pytest fixtures are imported and then taken as parameters)
"""A running `skyferry land` finds new work within a poll: a site that starts sending after the
lander started (an empty store at first, the usual first deployment), and new manifests of a site
it knows. Before, a new site waited for the next backfill (10 minutes by default).

The lag benchmark over 200 objects is `python -m benchmarks.land --only lag`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.kits.restore import ROOT, Cloud, Keys, keys  # noqa: F401 (fixture)
from tests.kits.site import render_toml

POLL_S = 1.0


def landed_ids(lake: Path) -> dict[str, float]:
    """object id -> landed_at (epoch seconds), from the event log."""
    out: dict[str, float] = {}
    for f in (lake / "_skyferry" / "events").rglob("*.jsonl"):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            out[e["object_id"]] = datetime.fromisoformat(e["landed_at"]).timestamp()
    return out


def wait_landed(lake: Path, object_id: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = landed_ids(lake)
        if object_id in found:
            return found[object_id]
        time.sleep(0.1)
    raise AssertionError(f"{object_id} did not land within {timeout} s")


def test_a_site_that_starts_sending_after_the_lander_lands_within_a_poll(
        keys: Keys, tmp_path: Path) -> None:
    cloud = Cloud(tmp_path / "sealed", keys, clock=datetime.now(UTC))
    cloud.root.mkdir()
    lake, work = tmp_path / "lake", tmp_path / "work"
    work.mkdir()
    cfg = tmp_path / "land.toml"
    cfg.write_text(render_toml({
        "source": {"url": cloud.url}, "dest": {"url": f"file://{lake}"},
        "land": {"key": str(keys.recipient_key), "work_dir": str(work),
                 "poll": f"{POLL_S}s", "backfill": "10m"}}))
    log = (tmp_path / "land.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "land", "-c", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 30  # started, and its backfill found an empty store
        while "land_pass" not in (tmp_path / "land.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "land.log").read_text()
            time.sleep(0.1)
        first = cloud.publish("first/of/the/site.txt", b"hello")
        shown = time.time()
        # A poll's period plus the landing itself; a missed site waited for the backfill.
        assert wait_landed(lake, first.manifest.object_id, 10) - shown < 3 * POLL_S + 2
        assert (lake / cloud.site / "files/first/of/the/site.txt").read_bytes() == b"hello"
        again = cloud.publish("second.txt", b"again")
        shown = time.time()
        assert wait_landed(lake, again.manifest.object_id, 10) - shown < 3 * POLL_S + 2
        assert len(landed_ids(lake)) == 2
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
