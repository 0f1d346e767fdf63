"""Object-store emulators for the suite: Azurite (Azure Blob) and moto (S3), once per session;
for the lander's work queues, Azurite's queue service and moto's SQS (the same moto server).

Each runs as a subprocess on a free 127.0.0.1 port. Azurite comes from the npm package pinned
in tests/emulators/package.json + package-lock.json (`npm ci` runs here when node_modules is
missing, so a fresh machine needs only Node.js and npm); moto from the `moto[server]` dev
extra. A server that cannot start fails the tests that need it with its log, never skips them.

Every test gets its own container or bucket (`make_cloud`), so tests never see each other's
objects, optionally behind a `FaultProxy`; and its own pair of queues (`make_queues`).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent.backends.azure import AZURITE_ACCOUNT, AZURITE_KEY
from agent.backends.config import load_backend_settings
from agent.backends.protocol import Backend
from agent.backends.registry import open_backend
from agent.backends.workqueue import QueueSettings, WorkQueue, load_queue_settings, open_work_queue
from tests.kits.faultproxy import FaultProxy
from tests.kits.site import free_port, render_toml

EMULATOR_DIR = Path(__file__).resolve().parents[1] / "emulators"
AZURITE_BIN = EMULATOR_DIR / "node_modules" / ".bin" / "azurite-blob"
AZURITE_QUEUE_BIN = EMULATOR_DIR / "node_modules" / ".bin" / "azurite-queue"
MOTO_ACCOUNT = "123456789012"  # the account id moto serves by default
MOTO_BIN = Path(sys.executable).parent / "moto_server"
S3_KEY_ID = "test"
S3_SECRET_ENV = "SKYFERRY_TEST_S3_SECRET"  # moto accepts any key pair; this one goes by env
START_TIMEOUT = 60.0


def install_azurite() -> None:
    """`npm ci` from the lock file, once, when node_modules is missing."""
    if AZURITE_BIN.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("Azurite is not installed and npm is missing: install Node.js and npm "
                    "(apt-get install nodejs npm), then run `make test-deps`", pytrace=False)
    r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EMULATOR_DIR,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not AZURITE_BIN.exists():
        pytest.fail(f"`npm ci` in {EMULATOR_DIR} failed ({r.returncode}):\n{r.stdout}\n"
                    f"{r.stderr}", pytrace=False)


@dataclass
class Emulator:
    kind: str  # "azurite" or "moto"
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    host: str = "127.0.0.1"

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def create_bucket(self) -> str:
        """A new, empty, uniquely named container (Azurite) or bucket (moto)."""
        name = f"t{uuid.uuid4().hex[:20]}"
        if self.kind == "azurite":
            status = azure_create_container(self.base, name)
        else:
            req = urllib.request.Request(f"{self.base}/{name}", method="PUT")
            with urllib.request.urlopen(req, timeout=10) as r:
                status = r.status
        assert status in (200, 201), f"creating {name} on {self.kind} answered {status}"
        return name

    def endpoint(self, base: str | None = None) -> str:
        """The [backend] endpoint: Azurite is path-style, with the account in the path."""
        base = base or self.base
        return f"{base}/{AZURITE_ACCOUNT}" if self.kind == "azurite" else base

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def azure_create_container(base: str, name: str) -> int:
    """One Create Container call signed with the account key (Shared Key), no SDK needed."""
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-12-02"}
    canonical = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    # Path-style (emulator) URLs put the account in the path, so it appears twice here.
    resource = f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container"
    to_sign = "PUT\n" + "\n" * 11 + canonical + resource
    digest = hmac.new(base64.b64decode(AZURITE_KEY), to_sign.encode(), hashlib.sha256).digest()
    auth = f"SharedKey {AZURITE_ACCOUNT}:{base64.b64encode(digest).decode()}"
    req = urllib.request.Request(f"{base}/{AZURITE_ACCOUNT}/{name}?restype=container",
                                 method="PUT",
                                 headers={**headers, "Authorization": auth,
                                          "Content-Length": "0"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _wait_ready(em: Emulator, probe: Callable[[], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if em.proc.poll() is not None:
            break
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.2)
    em.stop()
    log = em.log.read_text(errors="replace")[-3000:] if em.log.exists() else "(no log)"
    pytest.fail(f"the {em.kind} emulator did not start on port {em.port} within "
                f"{START_TIMEOUT:g}s (exit code {em.proc.returncode}); its log:\n{log}",
                pytrace=False)


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def start_azurite(workdir: Path) -> Emulator:
    install_azurite()
    port = free_port()
    log = workdir / "azurite.log"
    # SKYFERRY_AZURITE_DEBUG=1 keeps Azurite's request log, for when a test needs a look.
    verbosity = (["--debug", str(workdir / "azurite-debug.log")]
                 if os.environ.get("SKYFERRY_AZURITE_DEBUG") else ["--silent"])
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", str(port),
             "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--disableTelemetry",
             *verbosity],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    em = Emulator("azurite", port, proc, log)
    # Any HTTP answer (403 for an unsigned listing) means the server is up.
    _wait_ready(em, lambda: _http_status(f"{em.base}/{AZURITE_ACCOUNT}?comp=list") > 0)
    return em


def start_azurite_queue(workdir: Path) -> Emulator:
    """Azurite's queue service (its own process: azurite-blob serves blobs only)."""
    install_azurite()
    port = free_port()
    log = workdir / "azurite-queue.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(AZURITE_QUEUE_BIN), "--queueHost", "127.0.0.1", "--queuePort", str(port),
             "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--disableTelemetry",
             "--silent"],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    em = Emulator("azurite-queue", port, proc, log)
    _wait_ready(em, lambda: _http_status(f"{em.base}/{AZURITE_ACCOUNT}?comp=list") > 0)
    return em


def start_moto(workdir: Path) -> Emulator:
    if not MOTO_BIN.exists():
        pytest.fail(f"moto_server is missing beside {sys.executable}: install the dev extra "
                    "(pip install -e '.[dev]'), which includes moto[server]", pytrace=False)
    port = free_port()
    log = workdir / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(MOTO_BIN), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    em = Emulator("moto", port, proc, log)
    _wait_ready(em, lambda: _http_status(f"{em.base}/") == 200)
    return em


@contextlib.contextmanager
def moto_checks_credentials(em: Emulator) -> Iterator[None]:
    """moto accepts any key pair; inside this block it checks them (and knows none)."""
    def set_auth(count: str) -> None:
        req = urllib.request.Request(f"{em.base}/moto-api/reset-auth", data=count.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200

    set_auth("0")  # authenticate from the next request on
    try:
        yield
    finally:
        set_auth("inf")


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    em = start_azurite(tmp_path_factory.mktemp("azurite"))
    yield em
    em.stop()


@pytest.fixture(scope="session")
def azurite_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    em = start_azurite_queue(tmp_path_factory.mktemp("azurite-queue"))
    yield em
    em.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    em = start_moto(tmp_path_factory.mktemp("moto"))
    yield em
    em.stop()


@dataclass
class Cloud:
    """A fresh container or bucket (or folder), as a [backend] table, maybe behind a proxy."""

    kind: str  # "file", "azurite" or "moto"
    root: Path
    table: dict[str, Any]  # what the agent uses: through the proxy when there is one
    direct: dict[str, Any]  # straight to the emulator, for looking at what arrived
    proxy: FaultProxy | None = None
    _backend: Backend | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return str(self.table["url"])

    def write_config(self, table: dict[str, Any] | None = None) -> Path:
        """A TOML file holding a [backend] table (for --backend-config and loading)."""
        path = self.root / f"backend-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(render_toml({"backend": table or self.table}))
        return path

    def backend(self) -> Backend:
        """A Backend on the whole container or bucket (no prefix) that bypasses the proxy."""
        if self._backend is None:
            parts = urlsplit(self.url)
            root = {**self.direct, "url": f"{parts.scheme}://{parts.netloc}"} if (
                self.kind != "file") else self.direct
            self._backend = open_backend(load_backend_settings(self.write_config(root)))
        return self._backend

    def objects(self, prefix: str = "") -> dict[str, int]:
        """key -> size of everything stored (directly, not through the proxy)."""
        import asyncio

        async def listing() -> dict[str, int]:
            return {i.key: i.size async for i in self.backend().list(prefix)}

        return asyncio.run(listing())


def new_cloud(root: Path, em: Emulator | None, proxy: bool = False, prefix: str = "") -> Cloud:
    """A fresh container/bucket on `em` (None: a folder), maybe behind a started FaultProxy."""
    root.mkdir(parents=True, exist_ok=True)
    if em is None:
        folder = root / "cloud"
        folder.mkdir(parents=True, exist_ok=True)
        table = {"url": f"file://{folder}"}
        return Cloud("file", root, table, table)
    fp = FaultProxy("127.0.0.1", em.port).start() if proxy else None
    table, direct = _cloud_tables(root, em, fp, prefix)
    return Cloud(em.kind, root, table, direct, fp)


def _cloud_tables(root: Path, em: Emulator, proxy: FaultProxy | None,
                  prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    kind = em.kind
    name = em.create_bucket()
    scheme = "azure" if kind == "azurite" else "s3"
    url = f"{scheme}://{name}" + (f"/{prefix}" if prefix else "")
    common: dict[str, Any] = {"url": url, "allow_http": True, "connect_timeout": "3s",
                              "timeout": "15s", "min_rate": "1MB/s"}
    if kind == "azurite":
        key_file = root / "azure-account.key"
        key_file.write_text(AZURITE_KEY + "\n")
        key_file.chmod(0o600)
        creds: dict[str, Any] = {"account": AZURITE_ACCOUNT, "account_key_file": str(key_file)}
    else:
        # Daemons and CLI runs are subprocesses: they inherit this.
        os.environ.setdefault(S3_SECRET_ENV, "test")
        creds = {"region": "us-east-1", "access_key_id": S3_KEY_ID,
                 "secret_access_key_env": S3_SECRET_ENV}
    direct = {**common, **creds, "endpoint": em.endpoint()}
    via = dict(direct)
    if proxy is not None:
        via["endpoint"] = em.endpoint(proxy.endpoint)
    return via, direct


@pytest.fixture
def make_cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Cloud]]:
    """make_cloud(kind, proxy=False, prefix=""): a fresh store of that kind for this test."""
    proxies: list[FaultProxy] = []
    count = 0

    def make(kind: str, proxy: bool = False, prefix: str = "") -> Cloud:
        nonlocal count
        count += 1
        em: Emulator | None = None
        if kind != "file":
            assert kind in ("azurite", "moto"), kind
            em = request.getfixturevalue(kind)
        cloud = new_cloud(tmp_path / f"cloud-{kind}-{count}", em, proxy, prefix)
        if cloud.proxy is not None:
            proxies.append(cloud.proxy)
        return cloud

    yield make
    for p in proxies:
        p.stop()


@dataclass
class Queues:
    """A fresh work queue and its dead-letter queue, as a [queue] table."""

    kind: str  # "azurite" or "moto"
    root: Path
    table: dict[str, Any]
    dead_url: str  # the dead-letter queue's URL, to open it as a queue of its own

    @property
    def url(self) -> str:
        return str(self.table["url"])

    def write_config(self, table: dict[str, Any] | None = None) -> Path:
        """A TOML file holding a [queue] table (this one, or `table`)."""
        path = self.root / f"queue-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(render_toml({"queue": table or self.table}))
        return path

    def settings(self, **changes: Any) -> QueueSettings:
        """The settings a lander reads from its [queue] table, with `changes` to the table (a
        key changed to None is left out)."""
        table = {k: v for k, v in {**self.table, **changes}.items() if v is not None}
        return load_queue_settings(self.write_config(table))

    def open(self, **changes: Any) -> WorkQueue:
        s = self.settings(**changes)
        return open_work_queue(s.url, s.options)

    def open_dead(self) -> WorkQueue:
        """The dead-letter queue, to read what was sent there."""
        return self.open(url=self.dead_url, dead_letter=self.dead_url)


def new_queues(root: Path, em: Emulator) -> Queues:
    """Two new, uniquely named queues on `em` (work and dead-letter) as a [queue] table."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"q{uuid.uuid4().hex[:20]}"
    dead = f"{name}-dead"
    common: dict[str, Any] = {"dead_letter": dead, "allow_http": True, "connect_timeout": "3s",
                              "timeout": "10s", "retries": 1}
    if em.kind == "azurite-queue":
        from azure.storage.queue import QueueClient

        endpoint = f"{em.base}/{AZURITE_ACCOUNT}"
        for queue in (name, dead):
            QueueClient(endpoint, queue, credential={"account_name": AZURITE_ACCOUNT,
                                                     "account_key": AZURITE_KEY}).create_queue()
        key_file = root / "azure-account.key"
        key_file.write_text(AZURITE_KEY + "\n")
        key_file.chmod(0o600)
        table = {"url": f"azqueue://{AZURITE_ACCOUNT}/{name}", "endpoint": endpoint,
                 "account_key_file": str(key_file), **common}
        return Queues("azurite", root, table, f"azqueue://{AZURITE_ACCOUNT}/{dead}")
    os.environ.setdefault(S3_SECRET_ENV, "test")
    sqs = _sqs_client(em.base)
    for queue in (name, dead):
        sqs.create_queue(QueueName=queue)
    table = {"url": f"sqs://us-east-1/{MOTO_ACCOUNT}/{name}", "endpoint": em.base,
             "access_key_id": S3_KEY_ID, "secret_access_key_env": S3_SECRET_ENV, **common}
    return Queues("moto", root, table, f"sqs://us-east-1/{MOTO_ACCOUNT}/{dead}")


@functools.cache
def _sqs_client(endpoint: str) -> Any:
    """boto3 takes a good part of a second to make a client: one per moto server."""
    import boto3

    return boto3.client("sqs", region_name="us-east-1", endpoint_url=endpoint,
                        aws_access_key_id=S3_KEY_ID, aws_secret_access_key="test")


@pytest.fixture
def make_queues(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Queues]:
    """make_queues(kind): a fresh work + dead-letter queue pair on "azurite" or "moto"."""
    count = 0

    def make(kind: str) -> Queues:
        nonlocal count
        count += 1
        assert kind in ("azurite", "moto"), kind
        em = request.getfixturevalue("azurite_queue" if kind == "azurite" else "moto")
        return new_queues(tmp_path / f"queues-{kind}-{count}", em)

    return make
