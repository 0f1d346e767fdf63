"""Link benchmark: skyferry vs `rclone copy` to Azurite over a rate-limited link that is cut.

The link: a network namespace joined to the host by a veth pair, a `tbf` rate limit on the
namespace's (uplink) side, a one-way delay added by the fault proxy (tests/kits/faultproxy.py, since
`netem` is not in this kernel) that sits on the host end of the veth pair in front of Azurite,
and cuts on a seeded schedule (up 30-90 s, down 5-20 s by default). A cut is either
- `down`: the far (host) end of the veth pair is set down, or
- `blackhole`: nftables drops every IP packet arriving at either end while both ends stay up,
  which is what a lost satellite looks like to TCP (ARP still passes: the neighbour is the
  terminal, which stays up).
With `--cut both` the kinds alternate (down, black hole, down, ...). Both tools run inside the
namespace, one after the other, against the same Azurite (a fresh container each), over the
same link with the same schedule measured from each tool's start.

skyferry: the real daemon (`skyferry run`, via tests/sitekit.Site) with the corpus hard-linked
into its spool folder before it starts, an Azure backend through the link, and default
settings everywhere else. Delivered = every object committed (its manifest acknowledged).
rclone: `rclone copy CORPUS :azureblob:CONTAINER` with its default retries and transfers,
reaching Azurite through a container SAS URL (`RCLONE_AZUREBLOB_SAS_URL`). Delivered = exit 0.

Figures:
- time to deliver: from the tool's start (process launch) until delivered;
- goodput while up: the bytes the tool had to store (skyferry: sealed chunks and manifests;
  rclone: the corpus files) over the seconds the link was up from the first byte that crossed
  it to delivery, as a fraction of the tbf rate. The rate counts Ethernet, IP and TCP headers
  too, so a single bulk TCP stream tops out near 1448/1514 = 95.6 % of it;
- bytes re-sent: the proxy (at the far end of the link) parses the HTTP requests that cross
  it; every byte of a data PUT body that arrived there minus the bytes stored in the end.
  The data PUTs under way when each cut begins are recorded, so re-sent bytes are held
  against "the chunks in flight at each cut";
- completion: skyferry restores byte-identical (`skyferry restore`, straight from Azurite);
  rclone's objects all present with the right sizes.

    python -m benchmarks.link [--size 768MiB] [--rate 15Mbit/s] [--rtt 40ms] [--seed 6]
        [--cut down|blackhole|both] [--up 30-90] [--down 5-20] [--tools skyferry,rclone]
        [--streams N] [--timeout 20m] [--rclone-timeout 5m] [--no-verify] [--workdir DIR]
        [--no-write]

Defaults: 15 Mbit/s is what a typical LEO terminal uploads, 40 ms its round trip; 768 MiB of
corpus is ~330 MiB for skyferry to send (~4 min with its cuts) and 768 MiB for rclone
(~13 min), so a full run of both tools takes ~17 min on 2 cores and each meets cuts of both
kinds (with 512 MiB, skyferry finished before the schedule's first black hole).

Needs root (network namespaces, tc, nft) and rclone; writes the `link` section of
benchmarks/RESULTS.md; exits 1 when an acceptance line of issue 6 does not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from agent.backends.azure import AZURITE_ACCOUNT, AZURITE_KEY
from agent.config.units import format_size, parse_duration, parse_rate, parse_size
from benchmarks.run import add_output_options, write_report, write_section
from tests.kits import edge_corpus as corpus
from tests.kits.emulators import Emulator, start_azurite, start_moto
from tests.kits.faultproxy import FaultProxy
from tests.kits.netlink import Link, LinkUnavailable
from tests.kits.site import Site, render_toml, tree_digest

SECTION = "link"
MiB = 1 << 20
# Acceptance (issue 6).
GOODPUT_TARGET = 0.90
# Acceptance (issue 17, short outages).
RESENT_PER_UPLOAD = 1 << 20
TIME_RATIO = 0.40
GATE_CLOSE_S = 1.5
# Defaults: ~15 Mbit/s is what a typical LEO terminal uploads; 768 MiB of corpus is enough
# for skyferry to meet cuts of both kinds on the default schedule (a full run of both tools:
# ~17 min; rclone sends the corpus uncompressed).
DEFAULT_SIZE = "768MiB"
DEFAULT_RATE = "15Mbit/s"
DEFAULT_RTT = "40ms"
DEFAULT_UP = (30.0, 90.0)
DEFAULT_DOWN = (5.0, 20.0)
# Named schedules (--schedule). short-outages (issue 17): Starlink-like drops of seconds, many
# an hour: 15 s up, 15 s of black hole (TCP sees only silence), over and over.
SCHEDULES: dict[str, dict[str, str]] = {
    "short-outages": {"rate": "15Mbit/s", "cut": "blackhole", "up": "15", "down": "15"},
}
TOOLS = ("skyferry", "rclone")
SITE = "link-site"
BEHIND = {"azure": "Azurite", "s3": "moto (S3)"}
ANSWER_S = 0.5  # a request body that arrived this recently may still await its answer


# ---- the schedule ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Cut:
    at: float  # seconds after the tool's start
    duration: float
    kind: str  # "down" or "blackhole"


def make_schedule(seed: int, cut: str, horizon_s: float, up: tuple[float, float] = DEFAULT_UP,
                  down: tuple[float, float] = DEFAULT_DOWN) -> list[Cut]:
    """Cuts from t=0 to the horizon: up for U(up) seconds, then down for U(down), repeated.

    The same (seed, cut, up, down) gives the same schedule, for every tool.
    """
    rng = random.Random(seed)
    kinds = ["down", "blackhole"] if cut == "both" else [cut]
    cuts: list[Cut] = []
    t = 0.0
    while True:
        t += rng.uniform(*up)
        if t >= horizon_s:
            return cuts
        d = rng.uniform(*down)
        cuts.append(Cut(round(t, 3), round(d, 3), kinds[len(cuts) % len(kinds)]))
        t += d


@dataclass
class CutEvent:
    kind: str
    start: float  # monotonic
    end: float | None = None
    in_flight: list[Attempt] = field(default_factory=list)  # data PUTs under way at the cut


class Cutter(threading.Thread):
    """Plays a schedule on a link from t0 (monotonic) until stopped; records what it did."""

    def __init__(self, link: Link, cuts: list[Cut], t0: float,
                 in_flight: Callable[[], list[Attempt]] | None = None) -> None:
        super().__init__(name="link-cutter", daemon=True)
        self.link, self.cuts, self.t0 = link, cuts, t0
        self.in_flight = in_flight
        self.events: list[CutEvent] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            for c in self.cuts:
                if self._halt.wait(max(0.0, self.t0 + c.at - time.monotonic())):
                    return
                self.link.cut(c.kind)
                ev = CutEvent(c.kind, time.monotonic())
                self.events.append(ev)
                if self.in_flight is not None:
                    ev.in_flight = self.in_flight()
                self._halt.wait(max(0.0, self.t0 + c.at + c.duration - time.monotonic()))
                self.link.restore()
                ev.end = time.monotonic()
                if self._halt.is_set():
                    return
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self) -> None:
        self._halt.set()
        if self.ident is not None:
            self.join(30)
        if self.link.state != "up":
            self.link.restore()
            if self.events and self.events[-1].end is None:
                self.events[-1].end = time.monotonic()
        if self.error is not None:
            raise RuntimeError(f"the link cutter failed: {self.error}") from self.error


# ---- what crosses the link -------------------------------------------------------------------

@dataclass(eq=False)
class Attempt:
    """One HTTP request as it arrived at the far end of the link."""

    method: str
    target: str
    length: int  # Content-Length
    start: float  # monotonic: its head arrived
    received: int = 0  # body bytes that arrived
    done: float | None = None  # the whole body arrived
    data: bool = False  # a PUT of object bytes (a blob or a block of one), not a commit


def carries_data(method: str, target: str, length: int) -> bool:
    if method != "PUT" or length == 0:
        return False
    query = urlsplit(target).query
    return "comp=" not in query or "comp=block&" in query + "&"

    @property
    def key(self) -> str:
        return self.target


class _RequestStream:
    """Splits one connection's upstream bytes into HTTP requests (Content-Length bodies)."""

    def __init__(self, log: RequestLog) -> None:
        self.log = log
        self.head = bytearray()
        self.cur: Attempt | None = None
        self.left = 0
        self.broken = False

    def feed(self, data: bytes, now: float) -> None:
        while data:
            if self.broken:
                self.log.unparsed += len(data)
                return
            if self.left > 0:
                assert self.cur is not None
                n = min(self.left, len(data))
                self.cur.received += n
                self.left -= n
                if self.cur.data:
                    self.log.body.append((now, n))
                data = data[n:]
                if self.left == 0:
                    self.cur.done = now
                continue
            self.head += data
            data = b""
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 256 << 10:
                    self.broken = True
                    self.log.unparsed += len(self.head)
                return
            head, data = bytes(self.head[:end + 4]), bytes(self.head[end + 4:])
            self.head.clear()
            self.log.head_bytes += len(head)
            self._begin(head, now)

    def _begin(self, head: bytes, now: float) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        length, chunked = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip() or 0)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if len(parts) < 2 or chunked:
            self.broken = True  # not expected from either tool: counted as unparsed
            return
        a = Attempt(parts[0], parts[1], length, now,
                    data=carries_data(parts[0], parts[1], length))
        self.log.attempts.append(a)
        self.cur, self.left = a, length
        if length == 0:
            a.done = now


@dataclass
class RequestLog:
    attempts: list[Attempt] = field(default_factory=list)
    head_bytes: int = 0
    unparsed: int = 0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, bytes)
    body: list[tuple[float, int]] = field(default_factory=list)  # data PUT body bytes only


class LinkProxy(FaultProxy):
    """The fault proxy (delay) that also parses the requests arriving over the link.

    It hooks FaultProxy's upstream path (`_apply_cuts`, which sees every upstream block as it
    arrives, before the delay); this proxy never cuts connections itself.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.requests = RequestLog()
        self._streams: weakref.WeakKeyDictionary[Any, _RequestStream] = (
            weakref.WeakKeyDictionary())

    def in_flight(self) -> list[Attempt]:
        """The data PUTs under way now, on connections still open: the body still arriving,
        or complete so recently (ANSWER_S) that the answer may not have reached the client."""
        async def look() -> list[Attempt]:
            now = time.monotonic()
            out = []
            for conn, stream in list(self._streams.items()):
                a = stream.cur
                if conn.closed or a is None or not a.data:
                    continue
                if stream.left > 0 or (a.done is not None and now - a.done < ANSWER_S):
                    out.append(a)
            return out

        return asyncio.run_coroutine_threadsafe(look(), self._loop).result(10)

    def _apply_cuts(self, conn: Any, data: bytes) -> bytes | None:
        out = super()._apply_cuts(conn, data)
        if out:
            now = time.monotonic()
            self.requests.arrivals.append((now, len(out)))
            stream = self._streams.get(conn)
            if stream is None:
                stream = self._streams[conn] = _RequestStream(self.requests)
            stream.feed(out, now)
        return out


# ---- one tool's run ---------------------------------------------------------------------------

@dataclass
class ToolRun:
    tool: str
    started: float  # monotonic
    finished: float | None  # monotonic; None: did not complete
    completed: bool
    stored: int  # bytes the tool had to store (what ended up in the container)
    objects: int
    expected_objects: int
    cuts: list[CutEvent]
    requests: RequestLog
    link_bytes: int  # every upstream byte that crossed the link (heads, bodies, probes)
    check: str  # how completion was checked, and what it found
    notes: list[str] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)  # the tool's own retry counters
    backend: str = "azure"
    link_downs: list[float] = field(default_factory=list)  # monotonic: skyferry's gate closed

    @property
    def elapsed(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


@dataclass(frozen=True)
class Params:
    size: int
    rate_bps: float  # bytes per second
    rtt_s: float
    seed: int
    cut: str
    up: tuple[float, float]
    down: tuple[float, float]
    timeout_s: float  # per tool
    streams: int | None = None  # skyferry's [uplink] streams; None: its default
    backends: tuple[str, ...] = ("azure",)  # "azure" (Azurite), "s3" (moto)
    rclone_timeout_s: float | None = None  # rclone's --timeout (idle); None: its own, 5m


def _azure_store(em: Emulator, container: str) -> Any:
    from obstore.store import AzureStore
    return AzureStore(container, account_name=AZURITE_ACCOUNT, account_key=AZURITE_KEY,
                      endpoint=em.endpoint(), client_options={"allow_http": True})


def list_container(em: Emulator, container: str) -> dict[str, int]:
    """name -> size of every blob or object, straight from the emulator (not over the link)."""
    import obstore
    from obstore.store import S3Store
    store = _azure_store(em, container) if em.kind == "azurite" else S3Store(
        container, endpoint=em.endpoint(), region="us-east-1", access_key_id="test",
        secret_access_key="test", client_options={"allow_http": True},
        virtual_hosted_style_request=False)
    return {m["path"]: int(m["size"]) for batch in obstore.list(store) for m in batch}


def _backend_table(em: Emulator, endpoint: str, container: str, key_file: Path
                   ) -> dict[str, Any]:
    """skyferry's [backend] for this emulator at `endpoint` (the proxy's, or its own)."""
    if em.kind == "azurite":
        return {"url": f"azure://{container}", "endpoint": f"{endpoint}/{AZURITE_ACCOUNT}",
                "allow_http": True, "account": AZURITE_ACCOUNT,
                "account_key_file": str(key_file)}
    return {"url": f"s3://{container}", "endpoint": endpoint, "allow_http": True,
            "region": "us-east-1", "access_key_id": "test",
            "secret_access_key_file": str(key_file)}


def container_sas(container: str, hours: float = 24) -> str:
    """A service SAS (read, add, create, write, delete, list) for one Azurite container."""
    version, perms = "2019-02-02", "racwdl"
    expiry = datetime.fromtimestamp(time.time() + hours * 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # permissions, start, expiry, resource, identifier, IP, protocol, version, resource type,
    # snapshot time, then five response-header overrides.
    to_sign = "\n".join([perms, "", expiry, f"/blob/{AZURITE_ACCOUNT}/{container}", "", "", "",
                         version, "c", "", "", "", "", "", ""])
    sig = base64.b64encode(hmac.new(base64.b64decode(AZURITE_KEY), to_sign.encode(),
                                    hashlib.sha256).digest()).decode()
    return f"sv={version}&sr=c&sp={perms}&se={quote(expiry)}&sig={quote(sig, safe='')}"


def _stop_proc(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class _LogTail:
    """Reads a JSON-lines log as it grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.rest = path, 0, b""

    def new_events(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            with contextlib.suppress(ValueError):
                yield json.loads(line)


def _key_file(em: Emulator, work: Path) -> Path:
    key_file = work / "backend.key"
    key_file.write_text((AZURITE_KEY if em.kind == "azurite" else "test") + "\n")
    key_file.chmod(0o600)
    return key_file


def run_skyferry(params: Params, link: Link, em: Emulator, src: Path, work: Path,
                 verify: bool = True) -> ToolRun:
    """The daemon in the namespace, the corpus in its spool, until every object is committed."""
    files = corpus.files(src)
    container = em.create_bucket()
    key_file = _key_file(em, work)
    cuts = make_schedule(params.seed, params.cut, params.timeout_s, params.up, params.down)
    with LinkProxy("127.0.0.1", em.port, listen_host=link.host_addr) as proxy:
        proxy.delay_s = params.rtt_s / 2
        extra = {} if params.streams is None else {"uplink": {"streams": params.streams}}
        site = Site(work / "site", site_id=SITE,
                    backend=_backend_table(em, proxy.endpoint, container, key_file),
                    extra=extra)
        spool = site.spool()
        for p in files:  # hard links: instant, and the spool may delete them when done
            dest = spool / p.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dest)
        tail = _LogTail(site.log_path)
        # Small files travel in packs (one object for many files): delivered means every
        # file accepted and every object they went into committed.
        accepted: set[str] = set()
        objects: set[str] = set()
        committed: dict[str, float] = {}  # object -> when its manifest was acknowledged
        downs: list[float] = []  # when the gate closed for a lost link
        finished: float | None = None
        died = ""
        counts: dict[str, int] = {}
        t0 = time.monotonic()
        wall0 = time.time()
        cutter = Cutter(link, cuts, t0, proxy.in_flight)
        try:
            site.start(wrap=link.wrap)
            cutter.start()
            while time.monotonic() - t0 < params.timeout_s:
                for ev in tail.new_events():
                    name = str(ev.get("event"))
                    counts[name] = counts.get(name, 0) + 1
                    if name == "file_accepted":
                        accepted.add(str(ev.get("file")))
                        objects.add(str(ev.get("object")))
                    elif name == "object_committed":
                        stamp = datetime.fromisoformat(str(ev["ts"])).timestamp()
                        committed[str(ev.get("object"))] = t0 + (stamp - wall0)
                    elif name == "link_down":
                        stamp = datetime.fromisoformat(str(ev["ts"])).timestamp()
                        downs.append(t0 + (stamp - wall0))
                if len(accepted) == len(files) and objects <= committed.keys():
                    finished = max(committed[o] for o in objects)
                    break
                if site.proc is not None and site.proc.poll() is not None:
                    died = f"the daemon exited {site.proc.returncode}: {site.log_tail(3)}"
                    break
                time.sleep(0.1)
        finally:
            try:
                if site.proc is not None:
                    _stop_proc(site.proc)
            finally:
                site.close()
                cutter.stop()
        link_bytes = proxy.bytes_up
    stored = list_container(em, container)
    manifests = sum(1 for k in stored if "/manifests/" in k)
    completed = finished is not None and manifests == len(objects)
    check = died or f"{manifests}/{len(objects)} manifests in the container"
    if completed and verify:
        check = _restore_check(site, em, container, key_file, src, work)
        completed = check.startswith("restored")
    events = {k: counts.get(k, 0) for k in ("upload_retry", "upload_held", "upload_stalled",
                                            "upload_cut", "upload_resumed", "link_silent",
                                            "link_down", "link_up")}
    return ToolRun("skyferry", t0, finished, completed, sum(stored.values()), manifests,
                   len(objects), cutter.events, proxy.requests, link_bytes, check, events=events,
                   backend=params_backend(em), link_downs=downs)


def params_backend(em: Emulator) -> str:
    return "azure" if em.kind == "azurite" else "s3"


def _restore_check(site: Site, em: Emulator, container: str, key_file: Path, src: Path,
                   work: Path) -> str:
    """Restore straight from Azurite (not over the link) and compare with the corpus."""
    direct = _backend_table(em, em.base, container, key_file)
    cfg = work / "direct.toml"
    cfg.write_text(render_toml({"backend": direct}))
    out = work / "restored"
    r = site.cli("restore", "--backend", direct["url"], "--backend-config", str(cfg), "--key",
                 str(site.recipient_key), "--to", str(out), "--json", check=False, timeout=1800)
    if r.returncode != 0:
        return f"restore failed ({r.returncode}): {r.stderr.strip()[-300:]}"
    got = tree_digest(out / SITE / "files")
    want = tree_digest(src)
    want.pop(corpus.STAMP, None)
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        differ = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:3]
        return f"restore differs: missing {missing}, different {differ}"
    shutil.rmtree(out, ignore_errors=True)
    return f"restored {len(got)} files byte-identical"


def run_rclone(params: Params, link: Link, em: Emulator, src: Path, work: Path) -> ToolRun:
    """`rclone copy` in the namespace, to a fresh container through the link, to its exit."""
    files = corpus.files(src)
    container = em.create_bucket()
    cuts = make_schedule(params.seed, params.cut, params.timeout_s, params.up, params.down)
    conf = work / "rclone.conf"
    conf.write_text("")  # no user configuration: the remote is given on the command line
    log = work / "rclone.log"
    with LinkProxy("127.0.0.1", em.port, listen_host=link.host_addr) as proxy:
        proxy.delay_s = params.rtt_s / 2
        env = {**os.environ, "RCLONE_CONFIG": str(conf)}
        if em.kind == "azurite":
            env["RCLONE_AZUREBLOB_SAS_URL"] = (
                f"{proxy.endpoint}/{AZURITE_ACCOUNT}/{container}?{container_sas(container)}")
            remote = f":azureblob:{container}"
        else:
            # rclone 1.60 refuses a CA bundle for a plain-http endpoint ("transport
            # unsupported type"): the machine's AWS_CA_BUNDLE is not for this link.
            env.pop("AWS_CA_BUNDLE", None)
            env.update({"RCLONE_S3_PROVIDER": "Other", "RCLONE_S3_ENDPOINT": proxy.endpoint,
                        "RCLONE_S3_ACCESS_KEY_ID": "test", "RCLONE_S3_SECRET_ACCESS_KEY": "test",
                        "RCLONE_S3_REGION": "us-east-1", "RCLONE_S3_FORCE_PATH_STYLE": "true"})
            remote = f":s3:{container}"
        cmd = [*link.wrap, "rclone", "copy", str(src), remote,
               "--exclude", f"/{corpus.STAMP}", "-v", "--stats", "10s", "--log-file", str(log)]
        if params.rclone_timeout_s is not None:
            cmd += ["--timeout", f"{params.rclone_timeout_s:g}s"]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        cutter = Cutter(link, cuts, t0, proxy.in_flight)
        finished = None
        try:
            cutter.start()
            try:
                rc: int | None = proc.wait(params.timeout_s)
                finished = time.monotonic()
            except subprocess.TimeoutExpired:
                rc = None
        finally:
            try:
                _stop_proc(proc)
            finally:
                cutter.stop()
        link_bytes = proxy.bytes_up
    stored = list_container(em, container)
    want = {p.relative_to(src).as_posix(): p.stat().st_size for p in files}
    same = sum(1 for k, n in want.items() if stored.get(k) == n)
    completed = rc == 0 and same == len(want)
    check = (f"exit {rc if rc is not None else 'none (killed at the time limit)'}; "
             f"{same}/{len(want)} objects present with the right size")
    text = log.read_text(errors="replace") if log.exists() else ""
    events = {"low_level_retry": text.count("low level retry"),
              "attempt_failed": text.count("Attempt ")}
    return ToolRun("rclone", t0, finished if completed else None, completed,
                   sum(stored.values()), same, len(want), cutter.events, proxy.requests,
                   link_bytes, check, events=events, backend=params_backend(em))


# ---- figures ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CutFigures:
    index: int
    kind: str
    at: float  # seconds after the tool's start
    down_s: float
    in_flight: int  # data PUTs in flight when the cut began
    in_flight_bytes: int  # their full sizes
    resent: int  # bytes of wasted attempts attributed to this cut
    recovery_s: float | None  # link back -> first data bytes arriving again
    resent_per_upload: int = 0  # the most one upload (object, all its parts) wasted at it
    gate_close_s: float | None = None  # cut -> skyferry's gate closed (None: not during it)


@dataclass(frozen=True)
class Figures:
    tool: str
    backend: str
    completed: bool
    elapsed: float | None
    up_s: float
    stored: int
    goodput_bps: float | None
    fraction: float | None  # of the rate
    data_bytes: int  # data PUT body bytes that arrived
    resent: int  # data_bytes - stored
    unattributed: int  # wasted bytes outside any cut's in-flight set or aftermath
    cuts: list[CutFigures]


def analyse(run: ToolRun, rate_bps: float) -> Figures:
    end = run.finished if run.finished is not None else max(
        [a.done or a.start for a in run.requests.attempts] or [run.started])
    # Goodput is timed from the first byte on the link (process start-up, reading keys and
    # listing the destination are not the link's business) to delivery.
    first = run.requests.arrivals[0][0] if run.requests.arrivals else run.started
    down = 0.0
    for ev in run.cuts:
        a, b = max(ev.start, first), min(ev.end or end, end)
        down += max(0.0, b - a)
    up_s = (end - first) - down
    data = [a for a in run.requests.attempts if a.data]
    data_bytes = sum(a.received for a in data)
    cuts = [ev for ev in run.cuts if ev.start < end]
    # The useful attempt of a key is its last complete one; every other is wasted.
    useful: dict[str, Attempt] = {}
    for a in data:
        if a.done is not None and a.received == a.length:
            best = useful.get(a.target)
            if best is None or (best.done or 0) < a.done:
                useful[a.target] = a

    # A wasted attempt counts against the first cut it was in flight at; any other (a
    # timeout, a refused or duplicated request) against no cut.
    wasted_at = [0] * len(cuts)
    # ... and against its upload: an object's URL path (a block's or part's without its query)
    per_upload: list[dict[str, int]] = [{} for _ in cuts]
    unattributed = 0
    for a in data:
        if useful.get(a.target) is a or a.received == 0:
            continue
        hit = next((i for i, ev in enumerate(cuts) if any(a is b for b in ev.in_flight)), None)
        if hit is None:
            unattributed += a.received
        else:
            wasted_at[hit] += a.received
            path = urlsplit(a.target).path
            per_upload[hit][path] = per_upload[hit].get(path, 0) + a.received
    body = [t for t, _ in run.requests.body]
    figs: list[CutFigures] = []
    for i, ev in enumerate(cuts):
        flying = ev.in_flight
        back = ev.end
        # Object bytes again, on a resumed connection or a new request (probes do not count).
        first = None if back is None else next((t for t in body if t >= back), None)
        closed = [d for d in run.link_downs if ev.start <= d <= (ev.end or end)]
        figs.append(CutFigures(i + 1, ev.kind, ev.start - run.started,
                               (ev.end or end) - ev.start, len(flying),
                               sum(a.length for a in flying), wasted_at[i],
                               None if first is None or back is None else first - back,
                               max(per_upload[i].values(), default=0),
                               min(closed) - ev.start if closed else None))
    goodput = run.stored / up_s if run.completed and up_s > 0 else None
    return Figures(run.tool, run.backend, run.completed, run.elapsed, up_s, run.stored, goodput,
                   None if goodput is None else goodput / rate_bps, data_bytes,
                   data_bytes - run.stored, unattributed, figs)


@dataclass
class Report:
    params: Params
    command: list[str]
    corpus: str
    runs: dict[str, ToolRun]
    figures: dict[str, Figures]
    verdicts: list[tuple[str, bool | None, str]] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and the end


def run_name(tool: str, backend: str) -> str:
    """A run's name in reports: the tool, with the backend when it is not Azure (the first)."""
    return tool if backend == "azure" else f"{tool}-{backend}"


def verdicts(r: Report) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    for backend in r.params.backends:
        out += _verdicts(r, backend)
    return out


def _verdicts(r: Report, backend: str) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    sky = r.figures.get(run_name("skyferry", backend))
    rcl = r.figures.get(run_name("rclone", backend))
    on = "" if backend == "azure" else f" ({backend})"
    if sky is None:
        return [(f"skyferry measured{on}", None, "not run")]
    line = f"skyferry goodput while up >= {GOODPUT_TARGET:.0%} of the rate{on}"
    if sky.fraction is None:
        out.append((line, False, "skyferry did not complete"))
    else:
        assert sky.goodput_bps is not None
        out.append((line, sky.fraction >= GOODPUT_TARGET,
                    f"{sky.fraction:.1%} ({sky.goodput_bps * 8 / 1e6:.2f} of "
                    f"{r.params.rate_bps * 8 / 1e6:g} Mbit/s)"))
    # Each cut costs at most what was in flight at it, and all re-sending together (retries
    # away from any cut included) at most what all cuts had in flight.
    worst = [c for c in sky.cuts if c.resent > c.in_flight_bytes]
    held = not worst and sky.resent <= sum(c.in_flight_bytes for c in sky.cuts)
    detail = (f"{format_size(sky.resent)} re-sent in all, at most "
              f"{max((c.resent for c in sky.cuts), default=0):,} bytes at one cut; "
              f"{len(sky.cuts)} cuts with {format_size(sum(c.in_flight_bytes for c in sky.cuts))}"
              " of chunks in flight in all")
    if worst:
        detail += "; over the bound at cuts " + ", ".join(str(c.index) for c in worst)
    if sky.unattributed:
        detail += (f"; {sky.unattributed:,} of them away from any cut (a failed request "
                   "retried, e.g. on a connection the server had just closed)")
    out.append((f"skyferry bytes re-sent <= chunks in flight, per cut{on}", held, detail))
    # Issue 17: a cut costs at most ~1 MiB per upload in flight (parts resumed, not re-sent).
    most = max((c.resent_per_upload for c in sky.cuts), default=0)
    out.append((f"skyferry re-sent per upload in flight at a cut <= "
                f"{format_size(RESENT_PER_UPLOAD)}{on}", most <= RESENT_PER_UPLOAD,
                f"at most {most:,} bytes by one upload at one cut "
                f"({sum(c.in_flight for c in sky.cuts)} uploads in flight at "
                f"{len(sky.cuts)} cuts)"))
    flowing = [c for c in sky.cuts if c.in_flight and c.kind == "blackhole"]
    late = [c for c in flowing if c.gate_close_s is None or c.gate_close_s > GATE_CLOSE_S]
    delays = ", ".join("-" if c.gate_close_s is None else f"{c.gate_close_s:.2f}"
                       for c in flowing)
    out.append((f"gate closes <= {GATE_CLOSE_S:g} s after a black hole begins while data "
                f"flows{on}", None if not flowing else not late,
                f"{len(flowing)} black holes with data under way: {delays or 'none'} s"))
    line = f"skyferry time to deliver <= {TIME_RATIO:.2f}x rclone's{on}"
    if rcl is None:
        out.append((line, None, "rclone not run"))
    elif not sky.completed or sky.elapsed is None:
        out.append((line, False, "skyferry did not complete"))
    elif not rcl.completed or rcl.elapsed is None:
        out.append((line, True, f"skyferry {sky.elapsed:.0f} s; rclone did not complete "
                    f"within {r.params.timeout_s:.0f} s"))
    else:
        ratio = sky.elapsed / rcl.elapsed
        out.append((line, ratio <= TIME_RATIO,
                    f"{sky.elapsed:.0f} s vs {rcl.elapsed:.0f} s: {ratio:.2f}x"))
    return out


def _mb(n: int) -> str:
    return f"{n / MiB:,.1f}"


def render(r: Report) -> str:
    p = r.params
    mbit = p.rate_bps * 8 / 1e6
    settings = "" if p.streams is None else f" but `[uplink] streams = {p.streams}`"
    rclone_but = ("" if p.rclone_timeout_s is None else
                  f" but `--timeout {p.rclone_timeout_s:g}s` (its idle timeout, 5m by default)")
    lines = [
        f"## Link: skyferry vs rclone over a cut link (`{' '.join(r.command)}`)",
        "",
        f"Corpus (tests/kits/edge_corpus.py): {r.corpus}. Link: network namespace + veth, `tbf` "
        f"{mbit:g} Mbit/s on the uplink, {p.rtt_s * 1000:.0f} ms RTT added by the fault proxy, "
        f"cut on a schedule seeded {p.seed} (up {p.up[0]:g}-{p.up[1]:g} s, down "
        f"{p.down[0]:g}-{p.down[1]:g} s; cut kinds: {p.cut}), the same for both tools from "
        f"their start; {' and '.join(BEHIND[b] for b in p.backends)} behind it, one after "
        f"the other. Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on "
        f"{platform.machine()} ({os.cpu_count()} cores), Python {platform.python_version()}, "
        f"{_rclone_version()}. 1-minute load average {r.load[0]:.1f} at the start, "
        f"{r.load[1]:.1f} at the end"
        + (" (the machine was shared with other engineers' runs: figures taken under load)"
           if max(r.load) > (os.cpu_count() or 1) else "") + ".",
        "",
        "| tool | backend | completed | time to deliver s | link up s | bytes to store MiB "
        "| goodput while up Mbit/s | of the rate | bytes re-sent MiB | cuts | events | check |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, f in r.figures.items():
        run = r.runs[name]
        events = ", ".join(f"{k} {v}" for k, v in run.events.items())
        lines.append(
            f"| {run.tool} | {f.backend} | {'yes' if f.completed else '**no**'} | "
            f"{'-' if f.elapsed is None else f'{f.elapsed:.1f}'} | {f.up_s:.1f} | "
            f"{_mb(f.stored)} | "
            f"{'-' if f.goodput_bps is None else f'{f.goodput_bps * 8 / 1e6:.2f}'} | "
            f"{'-' if f.fraction is None else f'{f.fraction:.1%}'} | {_mb(f.resent)} | "
            f"{len(f.cuts)} | {events} | {run.check} |")
    lines += ["", "Per cut (time from the tool's start; in flight: data PUTs under way when the "
              "link went; recovery: link back to the first data bytes arriving again):", "",
              "| tool | backend | cut | kind | at s | down s | in flight | in flight MiB "
              "| re-sent MiB | most by one upload MiB | gate closed after s | recovery s |",
              "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, f in r.figures.items():
        for c in f.cuts:
            rec = "-" if c.recovery_s is None else f"{c.recovery_s:.1f}"
            gate = "-" if c.gate_close_s is None else f"{c.gate_close_s:.2f}"
            lines.append(f"| {r.runs[name].tool} | {f.backend} | {c.index} | {c.kind} | "
                         f"{c.at:.1f} | {c.down_s:.1f} | {c.in_flight} | "
                         f"{_mb(c.in_flight_bytes)} | {_mb(c.resent)} | "
                         f"{c.resent_per_upload / MiB:,.2f} | {gate} | {rec} |")
    lines += [
        "",
        "Goodput while up: bytes each tool had to store (skyferry: sealed, compressed chunks "
        "and manifests; rclone: the corpus as is) over the seconds the link was up from the "
        "first byte the tool sent to delivery, against the tbf rate, which counts "
        "Ethernet/IP/TCP headers "
        "(a lone bulk TCP stream reaches ~95.6 % of it). Re-sent: data PUT body bytes that "
        "arrived at the far end of the link minus the bytes stored; a wasted attempt counts "
        "against the cut it was in flight at (in flight: its body arriving, or arrived less "
        f"than {ANSWER_S:g} s before, on an open connection, when the link went). skyferry "
        f"ran at default settings{settings}; rclone with its defaults (4 transfers, 3 retries, "
        f"10 low-level retries){rclone_but}. Events: skyferry's log (`upload_held`: a "
        "request kept open through a lost link; `upload_stalled`: a held one still in TCP's "
        "retransmission backoff once the link was back, with nothing else to send, sent again; "
        "`upload_cut`: one cancelled and sent again; `upload_resumed`: an upload that found "
        "parts of it already at the service and sent only the others; `link_silent`: the "
        "uplink's own connections went unanswered and closed the gate) and rclone's. Most by "
        "one upload: the wasted bytes of the single upload (a chunk's blocks or parts "
        "together) that lost most at that cut. Gate closed after: from the cut to skyferry's "
        "`link_down`.",
        "",
        "Acceptance (issue 6; issue 17 for the per-upload, gate and time-ratio lines):",
        "",
    ]
    for line, held, detail in r.verdicts:
        word = "not measured" if held is None else ("holds" if held else "**misses**")
        lines.append(f"- {line}: {detail} — {word}")
    return "\n".join(lines)


def _rclone_version() -> str:
    try:
        out = subprocess.run(["rclone", "version"], capture_output=True, text=True, timeout=20)
        return out.stdout.splitlines()[0] if out.stdout else "rclone (version unknown)"
    except (OSError, subprocess.TimeoutExpired):
        return "rclone not installed"


# ---- driver ----------------------------------------------------------------------------------

def run(params: Params, workdir: Path, tools: tuple[str, ...] = TOOLS, verify: bool = True,
        command: list[str] | None = None, progress: Callable[[str], None] = print) -> Report:
    """Build the link, then for each backend its emulator, run each tool over the link in
    turn, return the figures."""
    if "rclone" in tools and shutil.which("rclone") is None:
        raise LinkUnavailable("rclone is not installed (sh benchmarks/setup.sh)")
    load_start = os.getloadavg()[0]
    src = workdir / "corpus"
    specs = corpus.generate(src, params.size, params.seed)
    desc = corpus.describe(specs)
    progress(f"corpus: {desc}")
    runs: dict[str, ToolRun] = {}
    with Link(params.rate_bps) as link:
        for backend in params.backends:
            (workdir / backend).mkdir(parents=True, exist_ok=True)
            em = (start_azurite if backend == "azure" else start_moto)(workdir / backend)
            try:
                for tool in tools:
                    name = run_name(tool, backend)
                    work = workdir / name
                    shutil.rmtree(work, ignore_errors=True)
                    work.mkdir(parents=True)
                    progress(f"{name}: sending over the link ...")
                    if tool == "skyferry":
                        runs[name] = run_skyferry(params, link, em, src, work, verify)
                    else:
                        runs[name] = run_rclone(params, link, em, src, work)
                    t = runs[name]
                    dump(t, work / "requests.json")
                    progress(f"{name}: {'completed' if t.completed else 'DID NOT COMPLETE'} in "
                             f"{t.elapsed or 0:.1f} s; {t.check}")
            finally:
                em.stop()
    figures = {name: analyse(t, params.rate_bps) for name, t in runs.items()}
    report = Report(params, command or ["python", "-m", "benchmarks.link"], desc, runs, figures,
                    load=(load_start, os.getloadavg()[0]))
    report.verdicts = verdicts(report)
    return report


def dump(t: ToolRun, path: Path) -> None:
    """What crossed the link, for a closer look: requests, arrivals, cuts (times from start)."""
    z = t.started
    path.write_text(json.dumps({
        "tool": t.tool, "finished": None if t.finished is None else t.finished - z,
        "cuts": [[c.kind, c.start - z, None if c.end is None else c.end - z] for c in t.cuts],
        "attempts": [[a.method, a.target, a.length, a.received, a.start - z,
                      None if a.done is None else a.done - z] for a in t.requests.attempts],
        "arrivals": [[round(at - z, 4), n] for at, n in t.requests.arrivals],
    }))


def _range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("-")
    a = parse_duration(lo)
    b = parse_duration(hi) if hi else a
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"{text!r}: give a range such as 30-90 (seconds)")
    return a, b


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.link",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default=DEFAULT_SIZE, help=f"corpus size (default {DEFAULT_SIZE})")
    ap.add_argument("--rate", default=DEFAULT_RATE, help=f"uplink rate (default {DEFAULT_RATE})")
    ap.add_argument("--rtt", default=DEFAULT_RTT, help=f"round trip added (default {DEFAULT_RTT})")
    ap.add_argument("--seed", type=int, default=6, help="corpus and schedule seed (default 6)")
    ap.add_argument("--cut", choices=("down", "blackhole", "both"), default="both",
                    help="how the link is cut; both: the kinds alternate (default)")
    ap.add_argument("--up", type=_range, default=DEFAULT_UP, help="seconds up, e.g. 30-90")
    ap.add_argument("--down", type=_range, default=DEFAULT_DOWN, help="seconds down, e.g. 5-20")
    ap.add_argument("--tools", default=",".join(TOOLS), help="skyferry,rclone (default both)")
    ap.add_argument("--streams", type=int, help="skyferry's [uplink] streams (default: its own)")
    ap.add_argument("--backend", choices=("azure", "s3", "both"), default="azure",
                    help="the service behind the link: Azurite, moto, or one after the other")
    ap.add_argument("--schedule", choices=tuple(SCHEDULES),
                    help="a named schedule: sets rate, cut kind, up and down (given options "
                         "still win)")
    ap.add_argument("--timeout", default="20m", help="give up on a tool after this long")
    ap.add_argument("--rclone-timeout",
                    help="rclone's --timeout, its idle timeout (default: rclone's own, 5m)")
    ap.add_argument("--no-verify", action="store_true", help="skip skyferry's restore check")
    ap.add_argument("--workdir", type=Path, help="keep the corpus and logs here")
    add_output_options(ap)
    args = ap.parse_args(argv)
    for name, value in SCHEDULES.get(args.schedule or "", {}).items():
        if f"--{name}" not in argv:
            setattr(args, name, value if name in ("rate", "cut") else _range(str(value)))
    tools = tuple(t for t in args.tools.split(",") if t)
    if unknown := set(tools) - set(TOOLS):
        ap.error(f"unknown tools: {', '.join(sorted(unknown))}")
    params = Params(parse_size(args.size), parse_rate(args.rate), parse_duration(args.rtt),
                    args.seed, args.cut, args.up, args.down, parse_duration(args.timeout),
                    args.streams,
                    ("azure", "s3") if args.backend == "both" else (args.backend,),
                    None if args.rclone_timeout is None else parse_duration(args.rclone_timeout))
    command = ["python", "-m", "benchmarks.link", *argv]
    started = time.monotonic()

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds: the link, daemons and Azurite are cleaned up

    signal.signal(signal.SIGTERM, terminated)
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            report = run(params, args.workdir, tools, not args.no_verify, command)
        else:
            with tempfile.TemporaryDirectory(prefix="skyferry-link-") as tmp:
                report = run(params, Path(tmp), tools, not args.no_verify, command)
    except LinkUnavailable as e:
        print(f"link benchmark skipped: {e}", file=sys.stderr)
        return 1
    write_report(report, args.report_json)
    text = render(report)
    print(text)
    print(f"(whole run {time.monotonic() - started:.0f} s)")
    if not args.no_write:
        section = SECTION if args.schedule is None else "_".join(
            ["link", args.schedule.replace("-", "_"), *params.backends])
        write_section(section, text, args.results)
    return 0 if all(held is not False for _, held, _ in report.verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
