"""The daemon's local socket and metrics port against hostile and careless local users:
descriptors instead of paths, timeouts and connection caps, `put` racing the daemon's start."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sources.put import MAX_CONNECTIONS, MAX_LINE, REQUEST_TIMEOUT_S
from agent.telemetry.status_page import HTTP_DEADLINE_S, HTTP_IO_TIMEOUT_S, HTTP_MAX_CONNECTIONS
from tests.kits.site import PYTHON, Site, wait_for

NOBODY = 65534  # uid of `nobody`, gid of `nogroup`
MARGIN_S = 10.0  # the machine is shared and loaded


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def events(site: Site, name: str) -> list[dict[str, Any]]:
    return [e for e in site.log_events() if e.get("event") == name]


def objects(site: Site) -> int:
    """Objects the store holds in any state."""
    return sum(sum(c["items"].values()) for c in site.status()["classes"].values())


@pytest.fixture
def open_site() -> Iterator[Callable[..., Site]]:
    """A site in a folder every user may traverse (pytest's own tmp is root's alone), with its
    socket in root/run: an unprivileged client can reach the config and the socket."""
    root = Path(tempfile.mkdtemp(prefix="skyferry-put-"))
    root.chmod(0o755)
    made: list[Site] = []

    def make(**kw: Any) -> Site:
        site_root = root / f"site{len(made)}"
        site_root.mkdir(mode=0o755)
        extra = {"put": {"socket": str(site_root / "run" / "sf.sock")}, **kw.pop("extra", {})}
        site = Site(site_root, extra=extra, **kw)
        made.append(site)
        return site

    yield make
    for s in made:
        s.close()
    shutil.rmtree(root, ignore_errors=True)


def sock_path(site: Site) -> Path:
    return site.root / "run" / "sf.sock"


def start(site: Site) -> None:
    site.start()
    wait_for(lambda: bool(events(site, "started")) and sock_path(site).exists(), 60,
             "the daemon to start", site)


# The interpreter lives under /root (mode 0700), which `nobody` cannot enter: the client
# starts as root, imports what it needs, then drops to nobody/nogroup before it opens or
# sends anything. The open and SO_PEERCRED both see nobody.
_AS_NOBODY = f"""
import importlib, os, sys, json, socket
for name in ("agent.cli.main", "agent.cli.put", "agent.cli.status", "agent.config.intake",
             "agent.daemon.site_config", "agent.sources.put", "agent.sources.put_client",
             "agent.config.units", "agent.cli.status_view"):
    try:
        importlib.import_module(name)
    except ImportError:  # a module this version lacks is one its client does not use
        pass
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
if sys.argv[1] == "cli":
    sys.exit(importlib.import_module("agent.cli.main").main(sys.argv[2:]))
# raw: send a put request carrying an O_PATH descriptor (which needs no read permission)
fd = os.open(sys.argv[3], os.O_PATH)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[2])
req = {{"op": "put", "path": sys.argv[3], "name": "stolen", "priority": "normal"}}
socket.send_fds(s, [json.dumps(req).encode() + b"\\n"], [fd])
print(s.makefile().readline())
"""


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", _AS_NOBODY, *args], capture_output=True, text=True,
                          timeout=120, cwd="/")


def raw_request(path: Path, req: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        socket.send_fds(s, [json.dumps(req).encode() + b"\n"], fds or [])
        reply: dict[str, Any] = json.loads(s.makefile().readline())
        return reply


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the client as nobody: needs root")
def test_a_client_cannot_get_a_file_it_cannot_read_uploaded(open_site: Callable[..., Site],
                                                            tmp_path: Path) -> None:
    site = open_site()
    secret = site.root / "secret.key"
    secret.write_bytes(b"PRIVATE " + os.urandom(64))
    secret.chmod(0o600)  # root's alone, in a folder nobody may enter
    readable = site.root / "readable.txt"
    readable.write_bytes(b"anyone may read this\n")
    readable.chmod(0o644)
    start(site)
    os.chown(sock_path(site), 0, NOBODY)  # nobody is a member of the socket's group
    cfg = str(site.config)

    # Control: nobody can queue what nobody can read, through the daemon.
    ok = as_nobody("cli", "put", "-c", cfg, str(readable))
    assert ok.returncode == 0 and "accepted as object" in ok.stdout, ok.stderr
    accepted = events(site, "put_accepted")
    assert [(e["file"], e["peer_uid"]) for e in accepted] == [("readable.txt", NOBODY)]

    # The client's own open fails: nothing reaches the daemon.
    r = as_nobody("cli", "put", "-c", cfg, str(secret))
    assert r.returncode == 1 and "cannot be read: Permission denied" in r.stderr, r.stderr
    # A raw client naming the path: the daemon does not open it.
    reply = raw_request(sock_path(site), {"op": "put", "path": str(secret), "name": "x",
                                          "priority": "normal"})
    assert not reply["ok"] and "no open file came with the request" in reply["error"]
    # A descriptor opened with O_PATH (allowed without read permission) is not readable.
    raw = as_nobody("raw", str(sock_path(site)), str(secret))
    assert raw.returncode == 0, raw.stderr
    assert '"ok": false' in raw.stdout and "not open for reading" in raw.stdout, raw.stdout
    refused = events(site, "put_refused")
    assert {e["peer_uid"] for e in refused} == {0, NOBODY} and len(refused) == 2

    site.wait_drained(expect_objects=1)
    assert objects(site) == 1
    site.stop()
    out = tmp_path / "out"
    site.restore(out)
    put_dir = out / site.site_id / "put"
    assert sorted(p.name for p in put_dir.iterdir()) == ["readable.txt"]
    assert (put_dir / "readable.txt").read_bytes() == readable.read_bytes()


def test_a_descriptor_that_is_not_a_regular_file_is_refused(
        open_site: Callable[..., Site]) -> None:
    site = open_site()
    start(site)
    r, w = os.pipe()
    try:
        reply = raw_request(sock_path(site), {"op": "put", "path": "p", "name": "p",
                                              "priority": "normal"}, [r])
    finally:
        os.close(r)
        os.close(w)
    assert not reply["ok"] and "not a regular file" in reply["error"]
    f = site.root / "two.txt"
    f.write_bytes(b"two descriptors")
    with open(f, "rb") as a, open(f, "rb") as b:
        two = raw_request(sock_path(site), {"op": "put", "path": "two", "name": "two",
                                            "priority": "normal"}, [a.fileno(), b.fileno()])
    assert not two["ok"] and "2 descriptors came with the request" in two["error"]
    bad_class = raw_request(sock_path(site), {"op": "put", "path": "p", "name": "p",
                                              "priority": "asap"})
    assert not bad_class["ok"] and "unknown class 'asap'" in bad_class["error"]
    for junk, why in ((b"not json\n", "malformed request"),
                      (b"[1, 2]\n", "malformed request"),
                      (b'{"op": "rm -rf"}\n', "unknown request"),
                      (b"x" * (MAX_LINE + 100), "longer than")):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(sock_path(site)))
            s.sendall(junk)
            answer = json.loads(s.makefile().readline())
        assert not answer["ok"] and why in answer["error"], (junk[:20], answer)
    assert len(events(site, "put_refused")) == 7  # one line each
    assert site.proc is not None and site.proc.poll() is None
    assert objects(site) == 0
    site.stop()


def _wait_all_closed(conns: list[socket.socket], timeout: float) -> float:
    """Seconds until every connection saw end-of-file (or a reset) from the server."""
    start_t = time.monotonic()
    sel = selectors.DefaultSelector()
    for c in conns:
        c.setblocking(False)
        sel.register(c, selectors.EVENT_READ)
    open_ = len(conns)
    while open_:
        left = timeout - (time.monotonic() - start_t)
        assert left > 0, f"{open_} of {len(conns)} connections still open after {timeout}s"
        for key, _ in sel.select(min(left, 1.0)):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                sel.unregister(s)
                open_ -= 1
    sel.close()
    return time.monotonic() - start_t


def test_300_idle_put_connections_are_closed_and_pin_no_threads(
        open_site: Callable[..., Site], tmp_path: Path) -> None:
    site = open_site()
    start(site)
    assert site.proc is not None
    time.sleep(1.0)  # let the executor and the HTTP thread settle
    before = threads(site.proc.pid)
    conns = []
    for _ in range(300):
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock_path(site)))  # blocking: waits for room in the backlog
        conns.append(c)
    c = conns[-1]
    c.sendall(b'{"op": "put", "name": "half-sent')  # and a half-sent request
    during = threads(site.proc.pid)
    try:
        took = _wait_all_closed(conns, REQUEST_TIMEOUT_S + MARGIN_S)
    finally:
        for c in conns:
            c.close()
    print(f"threads {before} before, {during} with 300 idle connections; all closed in "
          f"{took:.1f}s")
    assert during <= before + 4  # the daemon's own pools may add a worker meanwhile
    # The capped ones were turned away at once, the others closed by the timeout, and
    # the refusals are logged a few times, not 300 times.
    assert 0 < len(events(site, "put_busy")) <= 3
    assert 0 < len(events(site, "put_timeout")) <= 3
    assert MAX_CONNECTIONS < 300
    f = tmp_path / "after.txt"
    f.write_bytes(b"still serving")
    assert "accepted as object" in site.cli("put", "-c", str(site.config), str(f)).stdout
    assert site.stop() == 0


def test_400_idle_http_connections_are_closed_and_pin_few_threads(
        open_site: Callable[..., Site]) -> None:
    site = open_site()
    start(site)
    assert site.proc is not None
    url = f"http://127.0.0.1:{site.metrics_port}"
    wait_for(lambda: _get(url + "/status.json") is not None, 30, "the status page", site)
    time.sleep(1.0)
    before = threads(site.proc.pid)
    conns = []
    for _ in range(400):
        c = socket.create_connection(("127.0.0.1", site.metrics_port), timeout=30)
        conns.append(c)
    conns[0].sendall(b"GET /metrics HTTP/1.0\r\n")  # a request that never ends
    trickle = conns[1]
    time.sleep(1.0)
    during = threads(site.proc.pid)
    start_t = time.monotonic()
    # One client sends a header line every second: only the deadline ends it.
    trickle.sendall(b"GET / HTTP/1.0\r\n")
    trickle.settimeout(2)
    trickle_closed = None
    while time.monotonic() - start_t < HTTP_DEADLINE_S + MARGIN_S:
        try:
            trickle.sendall(b"X-Slow: 1\r\n")
            time.sleep(1.0)
        except OSError:
            trickle_closed = time.monotonic() - start_t
            break
    try:
        _wait_all_closed(conns, HTTP_IO_TIMEOUT_S + MARGIN_S)
    finally:
        for c in conns:
            c.close()
    print(f"threads {before} before, {during} with 400 idle connections; trickle closed "
          f"after {trickle_closed}s")
    assert during <= before + HTTP_MAX_CONNECTIONS + 4
    assert trickle_closed is not None and trickle_closed <= HTTP_DEADLINE_S + MARGIN_S
    assert 0 < len(events(site, "http_busy")) <= 3
    time.sleep(0.5)
    after = threads(site.proc.pid)
    assert after <= before + 4, f"{after} threads after the connections closed ({before})"
    body = _get(url + "/metrics")
    assert body is not None and b"skyferry_queue_items" in body
    assert site.stop() == 0
    log = site.log_path.read_text()
    assert "Traceback" not in log


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            data: bytes = r.read()
            return data
    except OSError:
        return None


def test_put_during_daemon_start_succeeds(open_site: Callable[..., Site],
                                          tmp_path: Path) -> None:
    site = open_site()
    for i, delay in enumerate((0.0, 0.3, 0.7, 1.2)):
        f = tmp_path / f"racing-{i}.bin"
        f.write_bytes(os.urandom(3 << 20))  # the direct writer holds the store a moment
        site.start()
        time.sleep(delay)
        r = site.cli("put", "-c", str(site.config), str(f), check=False, timeout=120)
        assert r.returncode == 0 and "accepted as object" in r.stdout, (delay, r.stderr,
                                                                        site.log_tail())
        wait_for(lambda: sock_path(site).exists(), 60, "the socket", site)
        assert site.proc is not None and site.proc.poll() is None, site.log_tail()
        site.wait_drained(expect_objects=i + 1)
        assert site.stop() == 0
    assert objects(site) == 4
    print(f"{len(events(site, 'put_accepted'))} of 4 puts went through the daemon's socket, "
          "the others into the store directly")


def test_store_lock_is_waited_for_then_refused_with_one_clear_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from agent.config.settings import ClassSettings
    from agent.errors import StoreLockedError
    from agent.store.store import Store

    classes = [ClassSettings("normal", 0, "refuse")]
    held = Store(tmp_path / "state", classes)
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO, logger="skyferry.store"), \
                pytest.raises(StoreLockedError) as e:
            Store(tmp_path / "state", classes, lock_wait_s=0.5)
        assert time.monotonic() - t0 >= 0.5
        assert "after waiting 0.5s" in str(e.value) and "\n" not in str(e.value)
        # While it waits, the wait is said once (a start that seems to hang says why).
        waiting = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
        assert len(waiting) == 1 and str(tmp_path / "state") in waiting[0], caplog.records
    finally:
        held.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="skyferry.store"):
        Store(tmp_path / "state", classes, lock_wait_s=0.5).close()  # free: taken at once
    assert not [r for r in caplog.records if "waiting up to" in r.getMessage()]


# ---- CLI output to a closed pipe --------------------------------------------------------


@pytest.mark.parametrize("command", [
    "windows --json --hours 8760 | head -1",  # more than a pipe holds: head leaves early
    "status | true",  # the reader is gone before the first write
])
def test_output_to_a_closed_pipe_exits_quietly(open_site: Callable[..., Site],
                                               command: str) -> None:
    site = open_site(extra={"windows": {"mode": "schedule",
                                        "timetable": "00:00,on 00:10,off 00:20,on 00:30,off",
                                        "link": {"probe": "none"}}})
    site.cli("put", "-c", str(site.config), str(site.config))  # a store for status
    verb, rest = command.split(" ", 1)
    args, reader = rest.split("|") if "|" in rest else ("", rest)
    shell = (f"{PYTHON} -m agent {verb} -c {site.config} {args} | {reader.strip()}; "
             "echo rc=${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.stderr == ""
    rc = int(r.stdout.rsplit("rc=", 1)[1])
    assert rc in (0, 141)


def test_descriptors_sent_in_many_pieces_are_refused_at_once() -> None:
    """Each piece of a request may carry descriptors: counted over the whole request, not per
    piece, or one client makes the daemon hold thousands (up to its descriptor limit)."""
    import asyncio
    import threading

    from agent.sources.put import MAX_FDS, Refused, read_request

    before = len(os.listdir("/proc/self/fd"))
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server.setblocking(False)
    f = os.open("/etc/hostname", os.O_RDONLY)

    def send() -> None:  # more pieces than the socket buffers: sent while the server reads
        with contextlib.suppress(OSError):
            for _ in range(MAX_FDS * 2):  # one descriptor per piece: never truncated
                socket.send_fds(client, [b" "], [f])
            client.sendall(b"{}\n")

    sender = threading.Thread(target=send)
    sender.start()
    try:
        async def read() -> None:
            await read_request(asyncio.get_running_loop(), server)

        with pytest.raises(Refused, match="descriptors"):
            asyncio.run(read())
    finally:
        server.close()
        sender.join(10)
        os.close(f)
        client.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_deep_json_and_fields_of_the_wrong_type_are_refused_plainly(tmp_path: Path) -> None:
    """A request nested past the JSON decoder's recursion limit, or a name that is not a
    string, is a malformed request (one clear refusal), not an internal error nor a file
    named "None"."""
    import asyncio

    from agent.sources.put import Peer, PutServer

    taken: list[str] = []

    async def ingest(req: Any) -> Any:
        taken.append(req.name)
        raise AssertionError("nothing here may be ingested")

    server = PutServer(tmp_path / "s.sock", ingest, ["normal"])
    peer = Peer(1, 2, 3)
    f = os.open("/etc/hostname", os.O_RDONLY)
    try:
        async def answer(line: bytes) -> dict[str, Any]:
            fds = [os.dup(f)]
            try:
                return await server._answer(line, fds, peer)
            finally:
                os.close(fds[0])

        for line, why in ((b"[" * 100_000, "malformed request"),
                          (b'{"op": "put", "name": null, "priority": "normal"}', "'name'"),
                          (b'{"op": "put", "name": {"a": 1}, "priority": "normal"}', "'name'"),
                          (b'{"op": "put", "name": 5, "priority": "normal"}', "'name'"),
                          (b'{"op": "put", "name": "x", "priority": "normal", "path": [1]}',
                           "'path'")):
            reply = asyncio.run(answer(line))
            assert not reply["ok"] and why in reply["error"], (line[:30], reply)
            assert "internal error" not in reply["error"]
    finally:
        os.close(f)
    assert taken == []


def test_a_loop_of_bad_requests_does_not_flood_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging

    from agent.sources.put import Peer, PutServer

    async def ingest(req: Any) -> Any:
        raise AssertionError("nothing here may be ingested")

    server = PutServer(tmp_path / "s.sock", ingest, ["normal"])

    async def loop() -> list[dict[str, Any]]:
        return [await server._answer(b"not json", [], Peer(1, 2, 3)) for _ in range(1000)]

    with caplog.at_level(logging.INFO, logger="skyferry.put"):
        replies = asyncio.run(loop())
    assert all(not r["ok"] and "malformed request" in r["error"] for r in replies)
    lines = [r for r in caplog.records if r.name == "skyferry.put"]
    assert 1 <= len(lines) <= 30, len(lines)
