"""Spool pieces in-process (issue 13): read leases and SIGIO, a file still open for writing,
the last-instant swap before a delete, a missing or unusable spool folder, and the state_dir
and keys never ingested. The running-daemon acceptance test is
tests/system/test_spool_hostile.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config.settings import SpoolSettings
from agent.ingest.opening import open_source
from agent.ingest.requests import IngestRequest, IngestResult
from agent.obs.metrics import Metrics
from agent.sources import spool_lease
from agent.sources.spool import SpoolSource
from agent.sources.spool_files import Hold, Kept, _delete, dispose
from agent.sources.spool_scan import Candidate, scan_fd

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root (leases on others' files, chown) and setpriv")


class Lines(logging.Handler):
    """The spool's log events, as (event, file, reason)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((getattr(record, "event", ""), getattr(record, "file", ""),
                            getattr(record, "reason", "")))

    def __enter__(self) -> Lines:
        logging.getLogger("skyferry.spool").addHandler(self)
        logging.getLogger("skyferry.spool").setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("skyferry.spool").removeHandler(self)


def one_file(root: Path, name: str, data: bytes) -> tuple[int, Candidate]:
    (root / name).write_bytes(data)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    (c,) = [c for c in scan_fd(fd, root).files if c.name == name]
    return fd, c


LEASE_AND_WAIT = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
print("leased", flush=True)
time.sleep(20)
"""


def test_a_writer_breaking_a_lease_neither_waits_nor_kills(tmp_path: Path) -> None:
    # Without a handler, SIGIO from a broken lease ends the process: what the daemon avoids.
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"x")
    proc = subprocess.Popen([sys.executable, "-c", LEASE_AND_WAIT, str(victim)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"leased\n"
    with open(victim, "ab") as f:
        f.write(b"y")
    assert proc.wait(30) == -signal.SIGIO

    assert spool_lease.install_sigio_handler()
    fd, c = one_file(tmp_path, "data.txt", b"sealed part\n")
    hold = Hold(fd, c)
    try:
        os.close(hold.open())
        assert hold.leased and not hold.writer_came()
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c",
                        f"open({str(tmp_path / 'data.txt')!r}, 'ab').write(b'more')"],
                       check=True, timeout=30)
        assert time.monotonic() - t0 < 10  # not the kernel's 45 s lease-break-time
        wait_until(hold.writer_came, 5)
        with pytest.raises(Kept) as kept:
            dispose(fd, c, hold, None)
        assert kept.value.reason == "changed"
    finally:
        hold.close()
        os.close(fd)
    assert (tmp_path / "data.txt").read_bytes() == b"sealed part\nmore"


def wait_until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_file_open_for_writing_is_not_settled(tmp_path: Path) -> None:
    assert spool_lease.install_sigio_handler()
    fd, c = one_file(tmp_path, "open.txt", b"partial")
    hold = Hold(fd, c)
    try:
        with open(tmp_path / "open.txt", "ab"):
            with pytest.raises(BlockingIOError):
                hold.open()
            assert hold.busy
    finally:
        hold.close()
        os.close(fd)


def spool_source(path: Path, **kw: Any) -> tuple[SpoolSource, list[str], Metrics]:
    taken: list[str] = []

    async def ingest(req: IngestRequest) -> IngestResult:
        fd = req.opener() if req.opener is not None else -1
        os.close(fd)
        taken.append(req.name)
        return IngestResult("obj", 0, 0, 0, 0)

    metrics = Metrics()
    settings = SpoolSettings(name="s", path=path, settle_s=0.0, scan_interval_s=0.01,
                             **kw)
    return SpoolSource(settings, ingest, metrics=metrics), taken, metrics


def test_a_file_written_between_the_scan_and_the_open_is_just_not_settled(
        tmp_path: Path) -> None:
    """A producer appends just as the daemon takes the file (after the scan's look, before the
    open): nothing was read, so no line for the operator; the whole file is taken next."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "late.log").write_bytes(b"first part\n")
    taken: list[bytes] = []

    async def ingest(req: IngestRequest) -> IngestResult:
        if not taken:  # the first attempt: the producer's append lands now
            with open(spool / "late.log", "ab") as f:
                f.write(b"appended\n")
            taken.append(b"")
        assert req.seen is not None
        fd = open_source(req, req.seen)  # what the pipeline opens with
        try:
            taken.append(os.read(fd, 1000))
        finally:
            os.close(fd)
        return IngestResult("obj", 0, 0, 0, 0)

    settings = SpoolSettings(name="s", path=spool, settle_s=0.0, scan_interval_s=0.01)
    source = SpoolSource(settings, ingest, metrics=Metrics())
    with Lines() as lines:
        for _ in range(5):
            asyncio.run(source.scan_once())
    assert taken == [b"", b"first part\nappended\n"]
    assert ("file_unsettled", "late.log", "") in lines.events
    assert [e for e in lines.events if e[0] == "spool_skipped"] == []
    assert not (spool / "late.log").exists()

    # Deleted by its producer as the daemon opens it: it went away, and that is said once.
    (spool / "gone.log").write_bytes(b"deleted at the open\n")

    async def delete_at_open(req: IngestRequest) -> IngestResult:
        assert req.opener is not None and req.seen is not None
        opener = req.opener

        def open_then_delete() -> int:
            fd = opener()
            (spool / "gone.log").unlink()
            return fd

        os.close(open_source(dataclasses.replace(req, opener=open_then_delete), req.seen))
        raise AssertionError("a deleted file was opened as if unchanged")

    source = SpoolSource(settings, delete_at_open, metrics=Metrics())
    with Lines() as lines:
        for _ in range(3):
            asyncio.run(source.scan_once())
    assert [e for e in lines.events if e[0] == "spool_skipped"] == [
        ("spool_skipped", "gone.log", "changed")]


def test_a_missing_spool_folder_is_one_line_and_retried(tmp_path: Path) -> None:
    path = tmp_path / "typo"
    source, _, metrics = spool_source(path)
    with Lines() as lines:
        for _ in range(3):
            asyncio.run(source.scan_once())
    assert not path.exists()
    assert [e for e in lines.events if e[0] == "spool_unusable"] == [("spool_unusable", "", "")]
    assert metrics.spool_skipped.labels("s", "spool_unusable")._value.get() == 1
    path.mkdir()
    (path / "late.txt").write_bytes(b"now it is there")
    source.settings = SpoolSettings(name="s", path=path, settle_s=0.0)
    with Lines() as lines:
        asyncio.run(source.scan_once())
    assert [e[0] for e in lines.events][:1] == ["spool_usable"]

    made = tmp_path / "made" / "here"
    source, _, _ = spool_source(made, create=True)
    asyncio.run(source.scan_once())
    assert made.is_dir()

    (tmp_path / "a-file").write_bytes(b"not a folder")
    for path in (tmp_path / "a-file", Path("/proc/self")):
        source, taken, metrics = spool_source(path, create=True)
        with Lines() as lines:
            for _ in range(2):
                asyncio.run(source.scan_once())
        assert [e[0] for e in lines.events] == ["spool_unusable"] and taken == []


def test_state_dir_and_keys_are_never_ingested(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    state = spool / "state"
    state.mkdir(parents=True)
    (state / "index.sqlite").write_bytes(b"SQLite format 3\0")
    key = spool / "site.key"
    key.write_bytes(b"secret key")
    (spool / "data.txt").write_bytes(b"data")
    taken: list[str] = []

    async def ingest(req: IngestRequest) -> IngestResult:
        taken.append(req.name)
        return IngestResult("obj", 0, 0, 0, 0)

    settings = SpoolSettings(name="s", path=spool, settle_s=0.0)
    source = SpoolSource(settings, ingest, protected=(key,), state_dir=state)
    with Lines() as lines:
        asyncio.run(source.scan_once())
    assert taken == ["data.txt"]
    assert (state / "index.sqlite").exists() and key.exists()
    assert ("spool_skipped", "site.key", "protected") in lines.events

    inside = SpoolSource(SpoolSettings(name="t", path=state / "sub", settle_s=0.0,
                                       create=True), ingest, state_dir=state)
    with Lines() as lines:
        asyncio.run(inside.scan_once())
    assert taken == ["data.txt"]
    assert [e[0] for e in lines.events] == ["spool_unusable"]
    assert not (state / "sub").exists(), "create = true made a folder inside state_dir"


NO_LEASE_SCRIPT = """
import os, sys
from pathlib import Path
from agent.sources import spool_lease
from agent.sources.spool_files import Hold, Kept, _delete, dispose
from agent.sources.spool_scan import scan_fd
root = Path(sys.argv[1])
assert spool_lease.install_sigio_handler()
fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
files = {c.name: c for c in scan_fd(fd, root).files}
hold = Hold(fd, files["same.txt"])
os.close(hold.open())
assert not hold.leased, "a lease without CAP_LEASE on another user's file"
dispose(fd, files["same.txt"], hold, None)
hold = Hold(fd, files["grown.txt"])
os.close(hold.open())
with open(root / "grown.txt", "ab") as f:
    f.write(b" and more")
try:
    dispose(fd, files["grown.txt"], hold, None)
    raise SystemExit("deleted a file that grew after it was sealed")
except Kept as k:
    assert k.reason == "changed", k.reason
print("fallback ok")
"""


def test_without_cap_lease_stat_checks_still_keep_a_changed_file(tmp_path: Path) -> None:
    for name in ("same.txt", "grown.txt"):
        (tmp_path / name).write_bytes(b"sealed")
        os.chown(tmp_path / name, 65534, 65534)  # a producer's file, not the daemon's
    r = subprocess.run(["setpriv", "--bounding-set", "-lease", "--", sys.executable, "-c",
                        NO_LEASE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "fallback ok" in r.stdout, r.stderr
    assert not (tmp_path / "same.txt").exists()
    assert (tmp_path / "grown.txt").read_bytes() == b"sealed and more"


def test_what_is_swapped_in_at_the_last_instant_is_put_back(tmp_path: Path) -> None:
    """Taken first, checked after: a new version or a link renamed over the name between
    the last check and the delete is put back, never deleted nor followed."""
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"outside")
    spool = tmp_path / "spool"
    spool.mkdir()
    for swap in ("new version", "link"):
        fd, c = one_file(spool, "x.txt", b"sealed")
        try:
            if swap == "link":
                (spool / "tmp").symlink_to(outside)
            else:
                (spool / "tmp").write_bytes(b"new version")
            os.replace(spool / "tmp", spool / "x.txt")
            with pytest.raises(Kept) as kept:
                _delete(fd, "x.txt", c)
            assert kept.value.reason == "changed"
        finally:
            os.close(fd)
        assert sorted(os.listdir(spool)) == ["x.txt"]
        if swap == "link":
            assert os.readlink(spool / "x.txt") == str(outside)
            os.unlink(spool / "x.txt")
        else:
            assert (spool / "x.txt").read_bytes() == b"new version"
    assert outside.read_bytes() == b"outside"


def test_a_file_with_a_name_of_255_bytes_is_deleted_and_moved(tmp_path: Path) -> None:
    """The aside and temporary names add to the file's name; at NAME_MAX they must still fit,
    or an accepted file stays in the spool and is ingested again at every restart."""
    long = "n" * 249 + "\u00e9\u00e9.b"  # 255 bytes in UTF-8
    assert len(os.fsencode(long)) == 255
    spool = tmp_path / "spool"
    spool.mkdir()
    fd, c = one_file(spool, long, b"long name")
    try:
        hold = Hold(fd, c)
        try:
            os.close(hold.open())
            dispose(fd, c, hold, None)
        finally:
            hold.close()
    finally:
        os.close(fd)
    assert os.listdir(spool) == []

    source, taken, _ = spool_source(spool, after="move")
    (spool / long).write_bytes(b"long name, moved")
    with Lines() as lines:
        asyncio.run(source.scan_once())
    assert taken == [long]
    assert [e for e in lines.events if e[0] == "spool_skipped"] == []
    assert (spool / "done" / long).read_bytes() == b"long name, moved"
    assert sorted(os.listdir(spool)) == ["done"]



def test_an_aside_file_left_by_a_kill_is_taken_back_once_and_stored_once(
        tmp_path: Path) -> None:
    """A kill -9 between renaming an accepted file aside and deleting it leaves the hidden
    `.NAME.skyferry-accepted` behind. At the next start it goes back under its name, is
    recognised as the version already stored (same name, size and mtime) and deleted: no
    second object, nothing left; a new file that took the name meanwhile is not replaced."""
    from agent.config.settings import DEFAULT_CLASSES, ChunkingSettings, CompressionSettings
    from agent.format.keys import generate_keys, load_edge_keys
    from agent.ingest.pipeline import Pipeline
    from agent.sources.spool_files import ASIDE_SUFFIX
    from agent.store.store import Store

    gen = generate_keys(tmp_path / "keys", "s")
    e = gen.edge_dir
    keys = load_edge_keys(e / "recipient.pub", e / "site.key", e / "dedup.key")
    store = Store(tmp_path / "state", DEFAULT_CLASSES)
    pipeline = Pipeline("s", keys, store, ChunkingSettings(), CompressionSettings(level=1))
    spool = tmp_path / "spool"
    (spool / "sub").mkdir(parents=True)

    async def ingest(req: IngestRequest) -> IngestResult:
        return await asyncio.to_thread(pipeline.ingest_file, req)

    def source() -> SpoolSource:
        return SpoolSource(SpoolSettings(name="s", path=spool, settle_s=0.0), ingest)

    def objects() -> int:
        return sum(sum(c.items.values()) for c in store.summary(time.time()).values())

    files = {"sub/x.txt": b"accepted, then the daemon was killed\n", "y.txt": b"y\n"}
    mtimes = {}
    for name, data in files.items():
        (spool / name).write_bytes(data)
        mtimes[name] = (spool / name).stat().st_mtime_ns
    first = source()
    asyncio.run(first.scan_once())
    assert first.accepted == 2 and not [p for p in spool.rglob("*") if p.is_file()]
    stored = objects()
    # The crash: each accepted version under its aside name, as the rename left it.
    asides = {}
    for name, data in files.items():
        aside = (spool / name).with_name(f".{Path(name).name}{ASIDE_SUFFIX}")
        aside.write_bytes(data)
        os.utime(aside, ns=(mtimes[name], mtimes[name]))
        asides[name] = aside
    (spool / "y.txt").write_bytes(b"a new y, written after the crash\n")
    with Lines() as lines:
        restarted = source()
        for _ in range(3):
            asyncio.run(restarted.scan_once())
    try:
        assert objects() == stored + 1  # the new y.txt; x.txt was known: no second object
    finally:
        store.close()
    # Nothing left: x.txt's aside came back and went; y.txt's waited for the new y.txt to
    # be taken (had it been put over it, the new content would be lost: no new object).
    assert not [p for p in spool.rglob("*") if p.is_file()]
    left = [e for e in lines.events if e[0] == "spool_skipped" and e[2] == "aside_left"]
    assert left == [("spool_skipped", f".y.txt{ASIDE_SUFFIX}", "aside_left")]


def test_a_deep_folder_tree_costs_one_open_per_folder(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each folder was opened from the spool root, component by component, at every scan:
    a producer's 60-deep tree cost 1,830 opens a scan (0.2 s scans: 1.5 % of a core, idle)."""
    spool = tmp_path / "spool"
    here = spool
    for i in range(60):
        here = here / f"d{i}"
    here.mkdir(parents=True)
    (here / "deep.txt").write_bytes(b"deep")
    for i in range(300):  # wide too: more folders than descriptors held at once
        (spool / f"w{i}").mkdir()
        (spool / f"w{i}" / "f.txt").write_bytes(b"w")
    root = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    opens = 0
    real_open = os.open

    def counting_open(*args: Any, **kw: Any) -> int:
        nonlocal opens
        opens += 1
        return real_open(*args, **kw)

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "open", counting_open)
    try:
        result = scan_fd(root, spool)
    finally:
        monkeypatch.undo()
        os.close(root)
    assert len(os.listdir("/proc/self/fd")) == before - 1, "a descriptor left open"
    assert len(result.files) == 301
    assert ("/".join(f"d{i}" for i in range(60)) + "/deep.txt") in {c.name for c in result.files}
    assert opens <= 2 * (60 + 300), opens


def test_a_pack_never_needs_more_descriptors_than_the_process_may_open(
        tmp_path: Path) -> None:
    """A pack holds one descriptor per file (its read lease) until the files are deleted.
    pack_files may be set up to 100,000; with 25,000 small files and a limit of 20,000
    descriptors every pack failed on EMFILE (each file logged as "changed"), was re-sealed
    once per failed member, and the next pass did the same: 100% of a core, nothing taken."""
    import resource

    from agent.config.settings import ChunkingSettings
    from agent.ingest.requests import PackResult

    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(1000):
        (spool / f"f{i:04d}").write_bytes(b"%04d" % i)
    packs: list[int] = []

    async def ingest(req: IngestRequest) -> IngestResult:
        raise AssertionError("small files go in packs")

    async def ingest_pack(reqs: list[IngestRequest]) -> PackResult:
        packs.append(len(reqs))
        fds = [r.opener() for r in reqs if r.opener is not None]  # as the pipeline does
        for fd in fds:
            os.close(fd)
        return PackResult("p", {r.name: IngestResult("p", 4, 0, 0, 0) for r in reqs}, {})

    chunking = ChunkingSettings(pack_files=100_000, pack_size=1 << 30)
    source = SpoolSource(SpoolSettings(name="s", path=spool, settle_s=0.0), ingest,
                         ingest_pack, chunking)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (400, hard))
    try:
        asyncio.run(source.scan_once())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert sum(packs) == 1000 and max(packs) <= 100, packs
    assert os.listdir(spool) == []
