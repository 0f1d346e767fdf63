"""Core acceptance 1 and 2: files in, byte-identical files out; an edit re-sends little.

The core test runs against every backend kind: a local folder, and Azurite (Azure Blob) and moto
(S3) reached through the fault proxy, which adds latency and cuts every connection a few times
during the upload. The test body is the same for all three.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kits.corpus import write_corpus
from tests.kits.emulators import Cloud
from tests.kits.site import Site, drop_file, tree_digest


def cloud_bytes(site: Site) -> int:
    return sum(site.cloud_objects().values())


@pytest.fixture(params=["file", "azurite", "moto"])
def backend(request: pytest.FixtureRequest,
            make_cloud: Callable[..., Cloud]) -> dict[str, Any] | None:
    """The [backend] table of the site under test; None is the site's own folder."""
    if request.param == "file":
        return None
    cloud = make_cloud(request.param, proxy=True)
    assert cloud.proxy is not None
    cloud.proxy.delay_s = 0.002
    # Three cuts of every open connection at random points of the ~80 MiB upload.
    rng = random.Random(request.param)
    cloud.proxy.cut_at_totals(rng.randrange(1 << 20, 70 << 20) for _ in range(3))
    return cloud.table


def test_300_files_restore_byte_identical_with_names_and_mtimes(
        make_site: Callable[..., Site], tmp_path: Path, backend: dict[str, Any] | None) -> None:
    site = make_site(spools={"telemetry": "normal", "alarms": "critical"}, backend=backend)
    corpus = {
        "telemetry": write_corpus(tmp_path / "unused", 240, seed=1, big=[64 << 20, 9 << 20]),
        "alarms": write_corpus(tmp_path / "unused", 60, seed=2, big=[3 << 20]),
    }
    base_mtime = int(time.time() - 86400) * 1_000_000_000
    mtimes: dict[str, int] = {}
    for spool, files in corpus.items():
        for i, (name, data) in enumerate(files.items()):
            mt = base_mtime + i * 1_000_000_123
            drop_file(site.spool(spool), name, data, mtime_ns=mt)
            mtimes[f"{spool}/{name}"] = mt
    assert sum(len(f) for f in corpus.values()) == 300
    sizes = [len(d) for f in corpus.values() for d in f.values()]
    assert min(sizes) <= 1 and max(sizes) == 64 << 20

    site.start()
    site.wait_drained(timeout=240, expect_objects=300)
    site.stop()

    out = tmp_path / "restored"
    report = json.loads(site.restore(out).stdout)
    assert report["ok"] and report["objects_ok"] == 300, report
    got = tree_digest(out / site.site_id)
    want = {f"{spool}/{name}": data for spool, files in corpus.items()
            for name, data in files.items()}
    assert sorted(got) == sorted(want), "restored names differ from the dropped names"
    import blake3

    for name, data in want.items():
        assert got[name] == (len(data), blake3.blake3(data).hexdigest()), name
        assert (out / site.site_id / name).stat().st_mtime_ns == mtimes[name], name
    assert json.loads(site.verify().stdout)["ok"]


def test_move_after_ingest_keeps_relative_names_in_done(make_site: Callable[..., Site],
                                                        tmp_path: Path) -> None:
    site = make_site()
    cfg = site.config.read_text().replace('scan_interval = "0.2s"',
                                          'scan_interval = "0.2s"\nafter = "move"')
    site.config.write_text(cfg)
    drop_file(site.spool(), "a/b/c.txt", b"nested")
    drop_file(site.spool(), "top.txt", b"top")
    site.start()
    deadline = time.monotonic() + 30
    done = site.spool() / "done"
    while time.monotonic() < deadline and not (done / "a/b/c.txt").exists():
        time.sleep(0.2)
    site.wait_drained(expect_objects=2)
    site.stop()
    assert (done / "a/b/c.txt").read_bytes() == b"nested"
    assert (done / "top.txt").read_bytes() == b"top"
    report = json.loads(site.restore(tmp_path / "out").stdout)
    assert report["objects_ok"] == 2, "files in done/ must not be ingested again"


def test_editing_1mib_of_200mib_resends_under_10_percent(make_site: Callable[..., Site],
                                                         tmp_path: Path) -> None:
    site = make_site()
    rng = random.Random(7)
    original = bytearray(rng.randbytes(200 << 20))
    drop_file(site.spool(), "big.bin", bytes(original))
    site.start()
    site.wait_drained(timeout=180, expect_objects=1)
    first = cloud_bytes(site)
    assert first >= 200 << 20

    middle = 100 << 20
    original[middle:middle + (1 << 20)] = rng.randbytes(1 << 20)
    edited = bytes(original)
    drop_file(site.spool(), "big.bin", edited,
              mtime_ns=time.time_ns() + 5_000_000_000)  # a new version of the same name
    site.wait_drained(timeout=180, expect_objects=2)
    site.stop()
    resent = cloud_bytes(site) - first
    print(f"1 MiB edit of a 200 MiB file re-sent {resent} bytes "
          f"({100 * resent / len(edited):.1f}%)")
    assert resent < 0.10 * len(edited), f"re-sent {resent} bytes for a 1 MiB edit"

    out = tmp_path / "out"
    report = json.loads(site.restore(out).stdout)
    assert report["superseded"] == 1
    assert (out / site.site_id / "files" / "big.bin").read_bytes() == edited


def test_put_without_daemon_then_daemon_uploads(make_site: Callable[..., Site],
                                                tmp_path: Path) -> None:
    site = make_site()
    f = tmp_path / "report.csv"
    f.write_bytes(b"a,b\n1,2\n")
    os.utime(f, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    r = site.cli("put", "-c", str(site.config), str(f), "--priority", "high")
    assert "accepted as object" in r.stdout
    again = site.cli("put", "-c", str(site.config), str(f))
    assert "already queued" in again.stdout
    site.start()
    site.wait_drained(expect_objects=1)
    # With the daemon running, put goes through its socket.
    g = tmp_path / "second.txt"
    g.write_bytes(b"second")
    r = site.cli("put", "-c", str(site.config), str(g), "--name", "renamed.txt")
    assert "accepted as object" in r.stdout
    site.wait_drained(expect_objects=2)
    site.stop()
    out = tmp_path / "out"
    site.restore(out)
    restored = out / site.site_id / "put" / "report.csv"
    assert restored.read_bytes() == b"a,b\n1,2\n"
    assert restored.stat().st_mtime_ns == 1_700_000_000_000_000_000
    assert (out / site.site_id / "put" / "renamed.txt").read_bytes() == b"second"
