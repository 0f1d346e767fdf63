"""A cloud folder filled directly with sealed, signed objects (real crypto, no daemon), and a
restore run against it in-process or through the real CLI.

Lets a test make in milliseconds what an honest site, a compromised site (it has the site's
keys) or an attacker with only the bucket and `recipient.pub` could put in the cloud.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent.backends.registry import open_backend
from agent.cloud.restore import Restorer, site_key_loader
from agent.cloud.restore_read import RestoreReport
from agent.format import crypto, layout
from agent.format.keys import generate_keys, load_edge_keys, load_recipient_private
from agent.format.manifest import KIND_FILE, KIND_FILE_PACK, ChunkRef, Manifest, PackEntry, uuid7

SITE = "camp-alpha"
MTIME_NS = 1_700_000_000 * 10**9
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Keys:
    dir: Path
    edge: crypto.EdgeKeys
    recipient: Any  # X25519PrivateKey

    @property
    def recipient_key(self) -> Path:
        return self.dir / "cloud" / "recipient.key"


def make_keys(folder: Path, site: str = SITE) -> Keys:
    gen = generate_keys(folder, site)
    e = gen.edge_dir
    return Keys(folder, load_edge_keys(e / "recipient.pub", e / "site.key",
                                       e / "dedup.key"),
                load_recipient_private(gen.cloud_dir / "recipient.key"))


@dataclass
class Published:
    key: str
    manifest: Manifest
    contents: dict[str, bytes]  # name -> bytes (one name, or a pack's files)


@dataclass
class Cloud:
    """A local-folder backend that a test writes sealed objects into."""

    root: Path
    keys: Keys
    site: str = SITE
    clock: datetime = field(default_factory=lambda: datetime(2026, 11, 25, 12, tzinfo=UTC))

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def write(self, key: str, blob: bytes) -> Path:
        """Whole or not at all, as a PUT makes an object appear: written aside, renamed."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f".{path.name}.part")
        aside.write_bytes(blob)
        os.replace(aside, path)
        return path

    def chunk(self, data: bytes, compress: bool = False) -> ChunkRef:
        cid = crypto.chunk_id(self.keys.edge.dedup_key, data)
        payload = zstandard.ZstdCompressor().compress(data) if compress else data
        blob = crypto.seal(payload, self.keys.edge.recipient_public, kind=crypto.KIND_CHUNK,
                           compression=crypto.COMPRESSION_ZSTD if compress
                           else crypto.COMPRESSION_NONE, plaintext_len=len(data))
        self.write(layout.chunk_key(self.site, cid), blob)
        return ChunkRef(cid, 0, len(data), crypto.content_hash(data))

    def chunks(self, data: bytes, size: int) -> tuple[ChunkRef, ...]:
        out = []
        for off in range(0, len(data), size):
            out.append(replace(self.chunk(data[off:off + size]), offset=off))
        return tuple(out)

    def tick(self) -> str:
        self.clock += timedelta(seconds=1)
        return self.clock.isoformat(timespec="microseconds")

    def manifest(self, name: str, data: bytes, *, source: str = "files", kind: str = KIND_FILE,
                 chunk_size: int = 1 << 20, entries: tuple[PackEntry, ...] = (),
                 **fields: Any) -> Manifest:
        base: dict[str, Any] = dict(
            object_id=uuid7(), site=self.site, source=source, kind=kind, name=name,
            size=len(data), mtime_ns=MTIME_NS, hash=crypto.content_hash(data),
            priority="normal", created=self.tick(),
            chunks=self.chunks(data, chunk_size) if data else (), entries=entries)
        base.update(fields)
        return Manifest(**base)

    def seal_manifest(self, body: bytes, compress: bool = False) -> bytes:
        signed = crypto.sign_manifest(body, self.keys.edge.signing_key)
        payload = zstandard.ZstdCompressor().compress(signed) if compress else signed
        return crypto.seal(payload, self.keys.edge.recipient_public, kind=crypto.KIND_MANIFEST,
                           compression=crypto.COMPRESSION_ZSTD if compress
                           else crypto.COMPRESSION_NONE, plaintext_len=len(signed))

    def put_manifest(self, m: Manifest, body: bytes | None = None, compress: bool = False) -> str:
        key = layout.manifest_key(self.site, self.clock.timestamp(), m.object_id)
        self.write(key, self.seal_manifest(m.to_json() if body is None else body, compress))
        return key

    def publish(self, name: str, data: bytes, **kw: Any) -> Published:
        m = self.manifest(name, data, **kw)
        return Published(self.put_manifest(m), m, {name: data})

    def publish_pack(self, files: list[tuple[str, bytes]], source: str = "files",
                     chunk_size: int = 1 << 20, **kw: Any) -> Published:
        entries, pos = [], 0
        for name, data in files:
            entries.append(PackEntry(name, pos, len(data), MTIME_NS, crypto.content_hash(data)))
            pos += len(data)
        blob = b"".join(d for _, d in files)
        oid = uuid7()
        m = self.manifest(f"{oid}.pack", blob, source=source, kind=KIND_FILE_PACK,
                          chunk_size=chunk_size, entries=tuple(entries), object_id=oid, **kw)
        return Published(self.put_manifest(m), m, dict(files))

    def manifest_json(self, m: Manifest) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(m.to_json())
        return out

    def restorer(self, parallel: int = 8) -> Restorer:
        return Restorer(open_backend(self.url), self.keys.recipient,
                        site_key_loader(self.keys.recipient_key.parent), parallel)

    def restore(self, target: Path | None, **kw: Any) -> RestoreReport:
        return asyncio.run(self.restorer().run(target, show_progress=False, **kw))


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes: the child's own peak (ru_maxrss of the waited-for child)
    seconds: float

    @property
    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.stdout)
        return out


# The CLI is started by a small launcher that reports the CLI's own peak RSS (wait4). Linux
# carries a process's peak RSS across exec, so a child forked straight from this (large) test
# process would report the test's size, not the CLI's.
_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(child.returncode)
"""


def run_cli(*args: str, timeout: float = 120) -> CliRun:
    """`python -m agent ARGS` in a child, with its peak RSS as the kernel counted it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        try:
            r = subprocess.run([sys.executable, "-c", _LAUNCHER, str(peak), sys.executable,
                                "-m", "agent", *args], capture_output=True, text=True,
                               env=env, cwd=ROOT, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"skyferry {' '.join(args)} did not finish in {timeout} s"
                                 ) from None
        return CliRun(r.returncode, r.stdout, r.stderr, int(peak.read_text()),
                      time.monotonic() - start)


# The fixtures the restore tests share; a test module takes them with
# `from tests.kits.restore import cloud, keys`. One key set per test module: generating keys is
# the slow part, and no test changes them.


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def cloud(keys: Keys, tmp_path: Path) -> Cloud:
    return Cloud(tmp_path / "cloud", keys)


# Hostile objects anyone with recipient.pub (or a compromised site) can make; shared by the
# restore and land tests of what they cost.

def forged_zstd(cloud: Cloud, kind: int, plaintext_len: int) -> bytes:
    """What anyone with recipient.pub can seal: a small zstd frame of `plaintext_len` zeros."""
    import zstandard

    from agent.format import crypto

    zeros = bytes(1 << 20)
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=plaintext_len)
    frame = b"".join(cobj.compress(zeros) for _ in range(plaintext_len // (1 << 20))) + cobj.flush()
    return crypto.seal(frame, cloud.keys.edge.recipient_public, kind=kind,
                       compression=crypto.COMPRESSION_ZSTD, plaintext_len=plaintext_len)


def put_raw_manifest(cloud: Cloud, name: str, chunk_json: list[str]) -> str:
    """A signed, compressed manifest whose chunk list is given as JSON text."""
    m = cloud.manifest(name, b"", size=len(chunk_json), hash="0" * 64)
    body = m.to_json().replace(b'"chunks":[]', b'"chunks":[' + ",".join(chunk_json).encode()
                               + b"]")
    return cloud.put_manifest(m, body, compress=True)
