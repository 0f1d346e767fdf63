# ruff: noqa: F811  (pytest fixtures are imported and then taken as parameters)
"""`skyferry land --once` (issue 16, slice 1): sealed objects land as plain files with their
metadata, exactly one event each, verified before visible, the bad ones quarantined with a reason,
the newest version of a name winning whatever order the manifests arrive in.

Real components only: the sealed store is a folder filled with real sealed, signed objects
(tests/kits/restore.py); destinations are a folder, Azurite and moto (tests/kits/emulators.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.backends.protocol import Backend
from agent.format.manifest import KIND_MQTT_BATCH
from tests.kits.emulators import Cloud as Store
from tests.kits.emulators import azurite, make_cloud, moto  # noqa: F401 (fixtures)
from tests.kits.restore import MTIME_NS, CliRun, Cloud, Keys, cloud, keys, run_cli  # noqa: F401
from tests.kits.site import render_toml

BIG = 17 * 2**20 + 12345  # more than 16 MiB: many chunks, a multipart upload
BATCH = b"".join(json.dumps({"topic": "t/1", "payload": f"m{i}"}).encode() + b"\n"
                 for i in range(50))


def land(cloud: Cloud, dest: Store | str, *extra: str) -> CliRun:
    """`skyferry land --once --json` from the test cloud into `dest`."""
    cfg = cloud.root.parent / "land.toml"
    tables: dict[str, Any] = {"source": {"url": cloud.url},
                              "land": {"key": str(cloud.keys.recipient_key)}}
    tables["dest"] = {"url": dest} if isinstance(dest, str) else dest.table
    cfg.write_text(render_toml(tables))
    r = run_cli("land", "-c", str(cfg), "--once", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return r


def everything(b: Backend, prefix: str = "") -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        return {i.key: await b.get(i.key) async for i in b.list(prefix)}

    return asyncio.run(read())


def head(b: Backend, key: str) -> tuple[int, dict[str, str]] | None:
    return asyncio.run(b.head(key))


def events(objects: dict[str, bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for k, v in sorted(objects.items())
            if k.startswith("_skyferry/events/") for line in v.decode().splitlines()]


def publish_corpus(cloud: Cloud) -> dict[str, bytes]:
    """A multi-chunk file, a pack of small files, non-ASCII names, an MQTT batch: what each
    should be in the destination, by key."""
    big = os.urandom(BIG)
    cloud.publish("survey/big.bin", big)
    cloud.publish("Überflug/日本語 ファイル.txt", "ça marche".encode())
    small = [(f"logs/ünï-{i}.log", f"line {i}\n".encode() * (i + 1)) for i in range(5)]
    cloud.publish_pack(small)
    cloud.publish("20261125T120000Z-0001", BATCH, source="telemetry", kind=KIND_MQTT_BATCH)
    site = cloud.site
    want = {f"{site}/files/survey/big.bin": big,
            f"{site}/files/Überflug/日本語 ファイル.txt": "ça marche".encode(),
            f"{site}/mqtt/telemetry/20261125T120000Z-0001.jsonl": BATCH}
    want.update({f"{site}/files/{n}": d for n, d in small})
    return want


def dest_of(kind: str, make_cloud: Callable[..., Store], tmp_path: Path) -> tuple[Store | str,
                                                                                   Backend]:
    from agent.backends.registry import open_backend

    if kind == "file":
        url = f"file://{tmp_path / 'lake'}"
        return url, open_backend(url)
    store = make_cloud(kind)
    return store, store.backend()


@pytest.mark.parametrize("kind", ["file", "azurite", "moto"])
def test_files_pack_and_batch_land_byte_identical_once_with_metadata_and_one_event_each(
        cloud: Cloud, make_cloud: Callable[..., Store], tmp_path: Path, kind: str) -> None:
    want = publish_corpus(cloud)
    dest, b = dest_of(kind, make_cloud, tmp_path)
    run = land(cloud, dest)
    report = run.report
    assert report["files"] == len(want) and not report["quarantined"], report
    assert run.peak_rss < 256 * 2**20, "the big file is staged on disk, not held in memory"
    got = everything(b)
    assert {k: v for k, v in got.items() if not k.startswith("_skyferry/")} == want
    for key, data in want.items():
        size, meta = head(b, key) or (0, {})
        assert size == len(data)
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["mtime"] == str(MTIME_NS) and meta["site"] == cloud.site
        assert meta["source"] == ("telemetry" if "/mqtt/" in key else "files")
        assert meta["object_id"] and meta["manifest_created"].startswith("2026-11-25T12:")
    if kind == "file":
        assert (tmp_path / "lake" / f"{cloud.site}/files/survey/big.bin").stat().st_mtime_ns \
            == MTIME_NS
    first = events(got)
    assert sorted(e["key"] for e in first) == sorted(want)
    assert len({e["id"] for e in first}) == len(first)
    again = land(cloud, dest).report
    assert again["files"] == 0 and again["manifests"] == 0, again
    assert events(everything(b)) == first, "a second --once emits no second event"


@pytest.mark.parametrize("kind", ["file", "azurite", "moto"])
def test_names_at_the_edge_of_what_a_folder_holds_land_everywhere(
        cloud: Cloud, make_cloud: Callable[..., Store], tmp_path: Path, kind: str) -> None:
    """A name of the form LocalStore keeps for itself (`run#1`) and names of 255 bytes, the
    most a site's folder holds: on a folder they were refused or failed as transient for
    ever (a temporary name beside them was too long)."""
    odd = {"odd/run#1": b"one", "odd/#7": b"seven", "odd/" + "é" * 127 + "x": b"long utf-8",
           "odd/" + "n" * 255: b"long"}
    single = "odd/" + "s" * 250 + "#2024"
    cloud.publish_pack(list(odd.items()))
    cloud.publish(single, b"single")
    want = {f"{cloud.site}/files/{k}": v for k, v in {**odd, single: b"single"}.items()}
    dest, b = dest_of(kind, make_cloud, tmp_path)
    report = land(cloud, dest).report
    assert report["files"] == len(want) and not report["quarantined"], report
    # LocalStore does not list `run#1`: a folder is read as files.
    got = everything_of(tmp_path / "lake") if kind == "file" else everything(b)
    assert {k: v for k, v in got.items() if not k.startswith("_skyferry/")} == want
    for key, data in want.items():
        size, meta = head(b, key) or (0, {})
        assert (size, meta["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert sorted(e["key"] for e in events(got)) == sorted(want)


def test_tampered_and_foreign_objects_are_quarantined_with_a_reason_and_the_rest_lands(
        cloud: Cloud, keys: Keys, tmp_path: Path) -> None:
    good = cloud.publish("good.txt", b"good")
    bad_manifest = cloud.publish("bad-manifest.txt", b"x" * 1000)
    path = cloud.root / bad_manifest.key
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 1
    path.write_bytes(bytes(blob))
    bad_chunk = cloud.publish("bad-chunk.txt", b"y" * 3000)
    from agent.format import layout

    chunk = cloud.root / layout.chunk_key(cloud.site, bad_chunk.manifest.chunks[0].id)
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 1
    chunk.write_bytes(bytes(data))
    foreign = Cloud(cloud.root, keys, site="camp-unknown")
    stranger = foreign.publish("foreign.txt", b"who am I")
    lake = tmp_path / "lake"
    report = land(cloud, f"file://{lake}").report
    reasons = {q["what"]: q["reason"] for q in report["quarantined"]}
    assert set(reasons) == {bad_manifest.key, bad_chunk.key, stranger.key}, report
    assert all(reasons.values())
    assert (lake / cloud.site / "files" / "good.txt").read_bytes() == b"good"
    landed = {p.relative_to(lake).as_posix() for p in lake.rglob("*") if p.is_file()
              and not p.relative_to(lake).as_posix().startswith("_skyferry/")}
    assert landed == {f"{cloud.site}/files/good.txt"}, "nothing unverified is visible"
    reports = [json.loads(p.read_text()) for p in (lake / "_skyferry/quarantine").rglob("*.json")]
    assert {r["sealed_key"] for r in reports} == set(reasons)
    assert all(r["reason"] for r in reports)
    assert good.key not in reasons
    again = land(cloud, f"file://{lake}").report
    assert again["manifests"] == 0, "a quarantined object is not tried again at each pass"


def test_newest_version_wins_when_manifests_arrive_newest_first(cloud: Cloud,
                                                                tmp_path: Path) -> None:
    versions = [cloud.manifest("report.csv", f"version {i}\n".encode() * (i + 1),
                               mtime_ns=MTIME_NS + i * 10**9) for i in range(3)]
    lake = tmp_path / "lake"
    out = lake / cloud.site / "files" / "report.csv"
    for m in reversed(versions):  # the newest arrives first, the oldest last
        cloud.put_manifest(m)
        land(cloud, f"file://{lake}")
        assert out.read_bytes() == b"version 2\n" * 3
        assert out.stat().st_mtime_ns == MTIME_NS + 2 * 10**9
    assert len(events(everything_of(lake))) == 1, "only the version that landed has an event"


def everything_of(lake: Path) -> dict[str, bytes]:
    return {p.relative_to(lake).as_posix(): p.read_bytes() for p in lake.rglob("*")
            if p.is_file()}


def test_bad_input_gets_one_clear_line(cloud: Cloud, tmp_path: Path) -> None:
    r = run_cli("land", "--once", "--dest", f"file://{tmp_path}/lake", "--key",
                str(cloud.keys.recipient_key))
    assert r.returncode == 2 and "--source" in r.stderr and len(r.stderr.splitlines()) == 1
    key = str(cloud.keys.recipient_key)
    for args, says in (
            (["--source", f"file://{tmp_path}", "--key", key], "give --dest URL"),
            (["--source", f"file://{tmp_path}", "--dest", f"file://{tmp_path}/lake"],
             "give --key PATH"),
            (["--source", f"file://{tmp_path}/nowhere", "--dest", f"file://{tmp_path}/lake",
              "--key", key], f"backend folder {tmp_path}/nowhere"),
    ):
        r = run_cli("land", "--once", *args)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1, r.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[source]\nurl = "s3://b"\nsecret_access_key = "inline"\n[land]\npoll = "x"\n')
    r = run_cli("land", "-c", str(cfg), "--once")
    assert r.returncode == 2 and "inline" in r.stderr and "land.poll" in r.stderr, r.stderr
    assert "\n" not in r.stderr.strip()
    cloud.publish("a.txt", b"a")  # an operational error: the destination cannot be written
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_cli("land", "--once", "--source", cloud.url, "--dest", f"file://{blocker}/lake",
                "--key", str(cloud.keys.recipient_key))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "a-file" in r.stderr, r.stderr


def test_the_service_finds_a_new_manifest_within_a_poll_and_stops_on_sigterm(
        cloud: Cloud, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time
    from datetime import UTC, datetime

    from tests.kits.restore import ROOT

    cloud.clock = datetime.now(UTC)  # a poll lists today's and yesterday's date folders
    cloud.publish("before.txt", b"there at start")
    lake = tmp_path / "lake"
    cfg = tmp_path / "land.toml"
    cfg.write_text(render_toml({"source": {"url": cloud.url}, "dest": {"url": f"file://{lake}"},
                                "land": {"key": str(cloud.keys.recipient_key), "poll": "200ms",
                                         "backfill": "1h", "work_dir": str(tmp_path)}}))
    proc = subprocess.Popen([sys.executable, "-m", "agent", "land", "-c", str(cfg)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = lake / cloud.site / "files" / "before.txt"
        deadline = time.monotonic() + 20
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.read_bytes() == b"there at start"
        cloud.publish("after.txt", b"sent while it runs")
        sent = time.monotonic()
        second = lake / cloud.site / "files" / "after.txt"
        # Landed means its event is written (the file is visible a moment before).
        while len(events(everything_of(lake))) < 2 and time.monotonic() < sent + 10:
            time.sleep(0.05)
        lag = time.monotonic() - sent
        assert second.read_bytes() == b"sent while it runs", "found by a poll, not a backfill"
        assert lag < 3, f"landed {lag:.1f} s after its manifest arrived (poll 200 ms)"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert '"land_file"' in out
    assert len(events(everything_of(lake))) == 2


def test_a_stop_between_landing_record_and_events_loses_no_event(cloud: Cloud,
                                                                  tmp_path: Path) -> None:
    """What a lander killed after creating a landing record leaves: the record and its pending
    marker, no events object. The next run writes the events once, from the record."""
    published = cloud.publish("a.txt", b"alpha")
    lake = tmp_path / "lake"
    land(cloud, f"file://{lake}")
    (event_file,) = (lake / "_skyferry" / "events").rglob("*.jsonl")
    before = event_file.read_text()
    event_file.unlink()
    marker = lake / "_skyferry" / "pending" / cloud.site / f"{published.manifest.object_id}.w-1"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(published.key)
    again = land(cloud, f"file://{lake}").report
    assert again["files"] == 0, "landed already: not landed again"
    assert event_file.read_text() == before, "the same events, written once"
    assert not marker.exists()
    land(cloud, f"file://{lake}")
    assert len(events(everything_of(lake))) == 1


def test_a_file_the_folder_destination_refuses_is_one_line_and_lands_once_fixed(
        cloud: Cloud, tmp_path: Path) -> None:
    """A folder where one file goes: that manifest is named, not landed (exit 1); everything
    else lands in the same run. Once the folder is moved away, the next run lands it, and each
    file has exactly one event in the end."""
    lake = tmp_path / "lake"
    blocked = lake / cloud.site / "files" / "survey" / "big.bin"
    blocked.mkdir(parents=True)  # a careless operator's folder, where a file will land
    want = publish_corpus(cloud)
    cfg = cloud.root.parent / "land.toml"
    cfg.write_text(render_toml({"source": {"url": cloud.url}, "dest": {"url": f"file://{lake}"},
                                "land": {"key": str(cloud.keys.recipient_key)}}))
    first = run_cli("land", "-c", str(cfg), "--once")
    assert first.returncode == 1, first.stderr
    refused = [line for line in first.stderr.splitlines() if line.startswith("NOT LANDED")]
    assert len(refused) == 1 and "a folder is where the file goes" in refused[0], first.stderr
    assert "Traceback" not in first.stderr
    landed = {k: (lake / k).read_bytes() for k in want if (lake / k).is_file()}
    assert landed == {k: v for k, v in want.items() if not k.endswith("big.bin")}
    blocked.rmdir()
    second = run_cli("land", "-c", str(cfg), "--once")
    assert second.returncode == 0, second.stderr
    assert (lake / cloud.site / "files" / "survey" / "big.bin").read_bytes() == \
        want[f"{cloud.site}/files/survey/big.bin"]
    got = sorted(e["key"] for f in sorted((lake / "_skyferry" / "events").rglob("*.jsonl"))
                 for e in map(json.loads, f.read_text().splitlines()))
    assert got == sorted(want)
