"""Backends against real emulators: configuration, create-only verified writes, error classes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.backends.azure import AZURITE_KEY, AzureSettings, parse_connection_string
from agent.backends.config import (
    BACKEND_COMMON_KEYS,
    backend_keys,
    inline_secrets,
    load_backend_settings,
)
from agent.backends.connections import connections_to
from agent.backends.protocol import Backend
from agent.backends.registry import open_backend, probe_target, services
from agent.backends.s3 import S3Settings
from agent.config.settings import BackendSettings, SecretRef
from agent.daemon.site_config import validate
from agent.errors import (
    ConfigError,
    PermanentBackendError,
    TransientBackendError,
)
from tests.kits.emulators import Cloud

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "skyferry.toml"
BASE: dict[str, Any] = {
    "site": {"id": "camp-alpha", "state_dir": "/var/lib/skyferry"},
    "keys": {"recipient_public": "r.pub", "signing_key": "s.key", "dedup_key": "d.key"},
}


def backend_problems(table: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate({**BASE, "backend": table}, Path("/etc/skyferry/skyferry.toml"))
    return info.value.problems


def opened(cloud: Cloud, **changes: Any) -> Backend:
    table = {**cloud.table, **changes}
    return open_backend(load_backend_settings(cloud.write_config(table)))


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", inline_secrets())
def test_inline_secrets_are_refused_with_a_fix(name: str) -> None:
    problems = backend_problems({"url": "s3://bucket", name: "hunter2"})
    [problem] = [p for p in problems if p.startswith(f"backend.{name}:")]
    assert "not accepted inline" in problem
    assert f"{name}_file" in problem and f"{name}_env" in problem
    assert "hunter2" not in problem, "a secret is never echoed"


def test_keys_of_another_scheme_are_named() -> None:
    problems = backend_problems({"url": "s3://bucket", "account": "acct",
                                 "sas_token_env": "SAS"})
    assert any(p.startswith("backend.account:") and "azure://" in p for p in problems)
    assert any(p.startswith("backend.sas_token_env:") for p in problems)


@pytest.mark.parametrize(("table", "key", "words"), [
    ({"url": "azure://container"}, "backend.account", "required"),
    ({"url": "azure://Bad_Name", "account": "a"}, "backend.url", "valid Azure container"),
    ({"url": "s3://b"}, "backend.url", "valid bucket"),
    ({"url": "s3://bucket", "endpoint": "http://127.0.0.1:9000"}, "backend.endpoint",
     "allow_http"),
    ({"url": "s3://bucket", "access_key_id": "AKIA"}, "backend.secret_access_key_file",
     "secret"),
    ({"url": "s3://bucket", "secret_access_key_env": "X"}, "backend.access_key_id", "key id"),
    ({"url": "s3://bucket", "secret_access_key_env": "not a name", "access_key_id": "a"},
     "backend.secret_access_key_env", "environment variable name"),
    ({"url": "azure://cont", "account": "a", "account_key_env": "K", "sas_token_env": "S"},
     "backend.sas_token_env", "conflicts"),
    ({"url": "s3://bucket", "timeout": "0s"}, "backend.timeout", "greater than zero"),
    ({"url": "s3://bucket", "allow_http": "yes"}, "backend.allow_http", "true or false"),
    ({"url": "abfs://c/p"}, "backend.url", "azure://container/prefix"),
])
def test_bad_backend_settings_name_key_and_fix(table: dict[str, Any], key: str,
                                               words: str) -> None:
    problems = backend_problems(table)
    assert any(p.startswith(f"{key}:") and words in p for p in problems), problems


def test_example_documents_every_backend_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    section = text[text.index("[backend]"):text.index("[uplink]")]
    missing = [k for k in backend_keys() if not re.search(rf"\b{k} = ", section)]
    assert missing == []
    # Uncommented, every documented line loads (apart from mutually exclusive credentials).
    settings = validate({**BASE, "backend": {
        "url": "s3://bucket/prefix", "endpoint": "https://s3.example.net", "region": "eu-west-1",
        "connect_timeout": "5s", "timeout": "20s", "min_rate": "64kbit/s",
        "access_key_id": "AKIA", "secret_access_key_file": "s3.secret",
        "session_token_env": "TOKEN"}}, Path("/etc/skyferry/skyferry.toml")).backend
    assert isinstance(settings.service, S3Settings)
    assert settings.service.secret_access_key == SecretRef("file", "/etc/skyferry/s3.secret")
    assert settings.service.session_token == SecretRef("env", "TOKEN")
    assert (settings.timeout_s, settings.min_rate_bps) == (20.0, 8000.0)


def test_each_key_and_scheme_belongs_to_one_service() -> None:
    """The registry's services split the [backend] table between them, nothing shared."""
    keys = [k for s in services() for k in s.keys]
    schemes = [n for s in services() for n in (s.scheme, *s.aliases)]
    assert len(keys) == len(set(keys)) and len(schemes) == len(set(schemes))
    assert not set(keys) & set(BACKEND_COMMON_KEYS)
    for s in services():
        assert {f"{n}_{way}" for n in s.secrets for way in ("file", "env")} <= set(s.keys)
    assert [s.scheme for s in services()] == ["file", "azure", "s3", "gs"]


def test_secrets_come_from_file_or_environment(tmp_path: Path) -> None:
    key = tmp_path / "azure.key"
    key.write_text(AZURITE_KEY + "\n")
    key.chmod(0o644)
    s = BackendSettings(url="azure://cont/p", service=AzureSettings(
        account="acct", account_key=SecretRef("file", str(key))))
    with pytest.raises(PermanentBackendError, match="chmod 600"):
        open_backend(s)
    key.chmod(0o600)
    assert "account key from file" in open_backend(s).credentials
    s = BackendSettings(url="azure://cont", service=AzureSettings(
        account="acct", account_key=SecretRef("env", "SKYFERRY_NO_SUCH_VAR")))
    with pytest.raises(PermanentBackendError, match="SKYFERRY_NO_SUCH_VAR is not set"):
        open_backend(s, env={})
    b = open_backend(s, env={"SKYFERRY_NO_SUCH_VAR": AZURITE_KEY})
    assert b.credentials == "account key from $SKYFERRY_NO_SUCH_VAR"


def test_every_scheme_opens_with_its_prefix(tmp_path: Path) -> None:
    cases = {
        "azure://cont/a/b": ("a/b", "container 'cont'"),
        "s3://bucket/x": ("x", "bucket 'bucket'"),
        "gs://bucket/y/z": ("y/z", "bucket 'bucket'"),
    }
    for url, (prefix, where) in cases.items():
        b = open_backend(BackendSettings(url=url, service=AzureSettings(account="acct")), env={})
        assert (b.prefix, b.where) == (prefix, where), url
    assert "default credential chain" in open_backend(BackendSettings(url="s3://bucket"),
                                                      env={}).credentials
    assert open_backend(f"file://{tmp_path}/cloud").prefix == ""


def test_auto_probe_targets() -> None:
    """What the link monitor's probe = "auto" probes: each service names its own."""
    assert probe_target(BackendSettings(url="file:///srv/cloud")) == "file:///srv/cloud"
    assert probe_target(BackendSettings(url="s3://b/p", service=S3Settings(
        region="eu-west-1"))) == "https://s3.eu-west-1.amazonaws.com/"
    assert probe_target(BackendSettings(url="s3://b", endpoint="http://127.0.0.1:9000")) == (
        "http://127.0.0.1:9000")
    assert probe_target(BackendSettings(url="gs://b")) == "https://storage.googleapis.com/"
    assert probe_target(BackendSettings(url="azure://c", service=AzureSettings(
        account="acct"))) == "https://acct.blob.core.windows.net/"


def test_connection_string_values_may_hold_equals_signs() -> None:
    parts = parse_connection_string(
        "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=ab==;BlobEndpoint=http://h/a;")
    assert parts == {"DefaultEndpointsProtocol": "http", "AccountName": "a", "AccountKey": "ab==",
                     "BlobEndpoint": "http://h/a"}


def test_connection_string_from_environment_reaches_azurite(
        make_cloud: Callable[..., Cloud], monkeypatch: pytest.MonkeyPatch) -> None:
    cloud = make_cloud("azurite")
    endpoint = cloud.direct["endpoint"]
    monkeypatch.setenv("SKYFERRY_TEST_AZ_CONN", f"DefaultEndpointsProtocol=http;AccountName="
                       f"devstoreaccount1;AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};")
    table = {k: v for k, v in cloud.direct.items()
             if k not in ("account", "account_key_file", "endpoint")}
    b = open_backend(load_backend_settings(cloud.write_config(
        {**table, "connection_string_env": "SKYFERRY_TEST_AZ_CONN"})))
    assert asyncio.run(b.put_if_absent("k", b"v")) is True
    assert b.credentials == "connection string from $SKYFERRY_TEST_AZ_CONN"


# ---- writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["azurite", "moto"])
def test_put_new_is_completed_by_a_read_back_that_removes_a_mismatch(
        make_cloud: Callable[..., Cloud], kind: str) -> None:
    """The uplink sends the next chunk while the last one is read back: the two halves."""
    cloud = make_cloud(kind)
    b = opened(cloud)

    async def scenario() -> None:
        first = await b.put_new("c/ab/abcd", b"x" * 1000)
        assert first.written and first.etag
        await b.verify_written("c/ab/abcd", 1000, first.etag)
        again = await b.put_new("c/ab/abcd", b"x" * 1000)
        assert not again.written, "create-only: already there"
        other = await b.put_new("c/cd/cdef", b"y" * 500)
        with pytest.raises(TransientBackendError) as info:  # the service kept a different size
            await b.verify_written("c/cd/cdef", 501, other.etag)
        assert info.value.kind == "verify" and "removed it" in str(info.value)
        assert await b.size("c/cd/cdef") is None, "a mismatch is removed, to be sent again"
        await b.put_new("c/cd/cdef", b"y" * 500)
        with pytest.raises(TransientBackendError) as info:  # not the ETag we were given
            await b.verify_written("c/cd/cdef", 500, '"not-the-etag"')
        assert info.value.kind == "verify"

    asyncio.run(scenario())
    assert cloud.objects() == {"c/ab/abcd": 1000}


@contextlib.contextmanager
def _loopback_connection() -> Iterator[tuple[int, socket.socket]]:
    """(port, client socket) of a real TCP connection over loopback, closed afterwards."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    peer, _ = server.accept()
    try:
        yield port, client
    finally:
        for s in (client, peer, server):
            s.close()


def test_connections_show_bytes_the_far_end_has_not_taken() -> None:
    """A real connection to a server that stops reading: data queued, but not stalled."""
    with _loopback_connection() as (port, client):
        assert connections_to(port) == [], "nothing under way yet"
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                client.send(b"\0" * 65536)  # until the far end's window and our buffer fill
        conns = connections_to(port)
        assert conns is not None and len(conns) == 1
        assert conns[0].queued > 0 and not conns[0].connecting
        assert not conns[0].stalled, "a full window is not a retransmission backoff"
        assert connections_to(port + 1 if port < 65535 else port - 1) == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                    reason="needs root and nftables to drop packets")
def test_connections_tell_a_black_holed_connection(tmp_path: Path) -> None:
    """Packets to a port dropped (nftables), as on a lost satellite link: the connection
    waits out TCP's retransmission backoff, and the kernel says so."""
    with _loopback_connection() as (port, client):
        table = f"sf_test_{uuid.uuid4().hex[:8]}"
        # Dropped on arrival, not on the way out: a local drop is an error TCP is told about.
        rules = (f"table inet {table} {{\n chain pre {{\n  type filter hook prerouting priority"
                 f" -300; policy accept;\n  tcp dport {port} drop\n }}\n}}\n")
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
        try:
            client.send(b"x" * 1000)
            deadline = time.monotonic() + 10
            conns = connections_to(port)
            while time.monotonic() < deadline and not (conns and conns[0].retransmits >= 2):
                time.sleep(0.1)
                conns = connections_to(port)
            assert conns is not None and len(conns) == 1
            c = conns[0]
            assert c.stalled and c.queued == 1000 and c.retransmits >= 2
            assert 0 < c.next_retransmit_s < 10
            # Socket diagnostics also say how long the far end has been silent; /proc (the
            # fallback, read for another process's view) says the rest the same way.
            assert c.since_ack_s is not None and c.since_ack_s >= 0.5
            assert c.rtt_s is not None and 0 < c.rtt_s < 1
            via_proc = connections_to(port, Path(f"/proc/{os.getpid()}"))
            assert via_proc is not None and len(via_proc) == 1
            p = via_proc[0]
            assert (p.queued, p.inode, p.since_ack_s) == (1000, c.inode, None) and p.stalled
        finally:
            subprocess.run(["nft", "delete", "table", "inet", table], check=False)

# ---- errors (the ones every backend maps: tests/system/test_backend_conformance.py) ------------


@pytest.mark.parametrize(("status", "kind"), [(503, "throttled"), (429, "throttled"),
                                              (500, "server_error")])
def test_error_answers_are_transient(make_cloud: Callable[..., Cloud], status: int,
                                     kind: str) -> None:
    cloud = make_cloud("moto", proxy=True)
    assert cloud.proxy is not None
    cloud.proxy.errors_for(30, status=status, retry_after=3)
    b = opened(cloud)
    with pytest.raises(TransientBackendError) as info:
        asyncio.run(b.put_if_absent("k", b"v"))
    assert info.value.kind == kind and f"HTTP {status}" in str(info.value)
    assert cloud.proxy.error_responses == 1, "obstore must not retry on its own"


def test_refused_connection_and_stall_are_transient(make_cloud: Callable[..., Cloud]) -> None:
    cloud = make_cloud("azurite", proxy=True)
    assert cloud.proxy is not None
    cloud.proxy.stall_for(60)
    b = opened(cloud, timeout="1s", min_rate="1MB/s")
    start = time.monotonic()
    with pytest.raises(TransientBackendError) as info:
        asyncio.run(b.put_if_absent("k", b"v" * 1_000_000))
    # timeout + size / min_rate = 1 s + 1 s
    assert info.value.kind == "timeout" and time.monotonic() - start < 5
    dead = opened(cloud, endpoint="http://127.0.0.1:9/devstoreaccount1", connect_timeout="1s")
    with pytest.raises(TransientBackendError) as info:
        asyncio.run(dead.put_if_absent("k", b"v"))
    assert info.value.kind == "connection"


# ---- command line -----------------------------------------------------------------------------


def test_restore_needs_a_backend_and_reads_backend_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli.main import main

    key = tmp_path / "recipient.key"
    assert main(["verify", "--key", str(key)]) == 2
    assert "give --backend URL, or --backend-config FILE" in capsys.readouterr().err
    config = tmp_path / "skyferry.toml"
    config.write_text('[site]\nid = "x"\n[backend]\nurl = "s3://bucket"\n'
                      'secret_access_key = "inline!"\n')
    assert main(["verify", "--backend-config", str(config), "--key", str(key)]) == 2
    err = capsys.readouterr().err
    assert "backend.secret_access_key: secrets are not accepted inline" in err
    assert "inline!" not in err, "a secret is never echoed"
