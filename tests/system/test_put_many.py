"""`skyferry put` of folders: many small files sealed as a few packs (one request each, not one
object per file), large files alone, names relative to the folder, irregular entries named
on one line each and nothing else lost; through the daemon and straight into the store."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
from pathlib import Path

from agent.config.units import format_size
from tests.kits.site import PYTHON, Site, tree_digest, wait_for

SMALL = 400  # files well below pack_below (1 MiB)
BIG = (3 << 20, (1 << 20) + 17)  # at and above pack_below: each its own object


def make_tree(root: Path) -> Path:
    rng = random.Random(17)
    data = root / "data"
    for i in range(SMALL):
        sub = data / f"d{i % 7}" / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        size = rng.choice((0, 1, 100, 4096, 60_000))
        (sub / f"f{i:04d}.log").write_bytes(rng.randbytes(size // 2) + b"x" * (size - size // 2))
    for n, size in enumerate(BIG):
        (data / f"big{n}.bin").write_bytes(rng.randbytes(size))
    (data / ".hidden").write_text("hidden files are queued too\n")
    return data


def add_irregular(data: Path) -> list[str]:
    """Entries put must name and skip; returns their paths as printed."""
    os.symlink("/etc/hostname", data / "d0" / "link")
    os.mkfifo(data / "d1" / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(data / "d2" / "sock"))
    s.close()
    bad = os.fsencode(str(data / "d3")) + b"/bad-\xff.txt"
    with open(bad, "wb") as f:
        f.write(b"name is not UTF-8")
    return [str(data / "d0" / "link"), str(data / "d1" / "fifo"), str(data / "d2" / "sock"),
            f"{data / 'd3'}/bad-\\xff.txt"]


def summary(data: Path) -> str:
    files = [p for p in data.rglob("*") if p.is_file() and not p.is_symlink()]
    size = sum(p.stat().st_size for p in files)
    return f"{data}: {len(files)} files accepted ({format_size(size)}) in {len(BIG) + 1} objects"


def manifests(site: Site) -> int:
    """Objects in the cloud (after the queue drained)."""
    return sum(1 for k in site.cloud_objects() if "/manifests/" in k)


def test_put_of_a_folder_through_the_daemon_packs_small_files_and_restores_identical(
        tmp_path: Path) -> None:
    site = Site(tmp_path / "site", spools={})
    data = make_tree(tmp_path)
    want = tree_digest(data)
    expected = summary(data)
    irregular = add_irregular(data)
    site.start()
    try:
        wait_for(lambda: site.config.exists() and any(
            e.get("event") == "started" for e in site.log_events()), 60, "start", site)
        r = site.cli("put", "-c", str(site.config), "--priority", "bulk", str(data),
                     check=False)
        assert r.returncode == 1, r.stderr  # irregular entries were not queued
        lines = r.stderr.strip().splitlines()
        assert len(lines) == len(irregular), r.stderr
        for path, line in zip(sorted(irregular), sorted(lines), strict=True):
            assert line.startswith(f"skyferry put: {path}: "), line
        assert "symbolic link; links are never followed" in r.stderr
        assert r.stdout.strip().splitlines() == [expected], r.stdout
        site.wait_drained(120)
        # Every small file in one pack (one commit), each big file alone: not one per file.
        assert manifests(site) == len(BIG) + 1
    finally:
        site.stop()
    out = tmp_path / "restored"
    site.restore(out)
    # Names relative to the folder (restore puts them under SITE/SOURCE), bytes identical.
    assert tree_digest(out / site.site_id / "put") == want


def test_put_without_a_daemon_writes_packs_into_the_store_then_uploads(tmp_path: Path) -> None:
    site = Site(tmp_path / "site", spools={})
    data = make_tree(tmp_path)
    r = site.cli("put", "-c", str(site.config), "--name", "site-a", str(data))
    assert r.stdout.splitlines() == [summary(data)]
    one = site.cli("put", "-c", str(site.config), str(data / "big0.bin"))
    assert one.stdout.startswith(f"{data / 'big0.bin'}: accepted as object ")
    # Again: every file is recognised as queued already, nothing new is stored.
    again = site.cli("put", "-c", str(site.config), "--name", "site-a", str(data))
    assert again.stdout.strip().endswith(f", {SMALL + len(BIG) + 1} of them already queued")
    site.start()
    try:
        site.wait_drained(120)
        assert manifests(site) == len(BIG) + 2
    finally:
        site.stop()
    out = tmp_path / "restored"
    site.restore(out)
    got = tree_digest(out / site.site_id / "put")
    want = {f"site-a/{k}": v for k, v in tree_digest(data).items()}
    want["big0.bin"] = want["site-a/big0.bin"]
    assert got == want


# Run `skyferry put` in-process, then name the modules it loaded (last line of stderr).
_PUT_AND_LIST = """
import json, sys
from agent.cli.main import main
code = main(sys.argv[1:])
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
sys.exit(code)
"""
# What only a put that finds no daemon needs: the whole config's validation, keys, the store,
# the pipeline (tens to hundreds of milliseconds of every put on a busy two-core site).
HEAVY = ("agent.daemon.site_config", "agent.format.keys", "agent.store.store",
         "agent.ingest.pipeline", "agent.sources.put", "asyncio")


def put_listing_modules(site: Site, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                          set[str]]:
    r = subprocess.run([PYTHON, "-c", _PUT_AND_LIST, "put", "-c", str(site.config), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r, set(json.loads(r.stderr.strip().splitlines()[-1]))


def test_put_through_the_daemon_stays_light_and_groups_by_the_configs_chunking(
        tmp_path: Path) -> None:
    """A put that finds a daemon reads [site], [classes], [put] and [chunking] only: one file or
    a folder, it loads no pipeline, store or whole-config validation; the folder is still
    grouped by the config's pack thresholds (pack_files = 2: five small files, three packs)."""
    site = Site(tmp_path / "site", spools={}, extra={"chunking": {"pack_files": 2}})
    data = tmp_path / "few"
    data.mkdir()
    for i in range(5):
        (data / f"s{i}.txt").write_bytes(os.urandom(100 + i))
    alarm = tmp_path / "alarm.bin"
    alarm.write_bytes(os.urandom(1024))
    site.start()
    try:
        wait_for(lambda: any(e.get("event") == "started" for e in site.log_events()), 60,
                 "start", site)
        one, loaded = put_listing_modules(site, "--priority", "critical", str(alarm))
        assert one.stdout.startswith(f"{alarm}: accepted as object "), one.stdout
        assert not loaded & {*HEAVY, "concurrent.futures"}, sorted(loaded & {*HEAVY})
        many, loaded = put_listing_modules(site, str(data))
        assert many.stdout.strip() == f"{data}: 5 files accepted (510 B) in 3 objects", many.stdout
        assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    finally:
        site.stop()
