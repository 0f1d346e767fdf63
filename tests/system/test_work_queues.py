"""The lander's work queues (agent/backends/workqueue*.py) against the real emulators: Azurite's
queue service and moto's SQS, each test on its own fresh queue pair (work + dead-letter).

Leases are 1 s (the services count whole seconds), so lease expiry costs about a second a test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.backends.azure import AZURITE_KEY
from agent.backends.workqueue import (
    MAX_BODY_BYTES,
    LeaseLostError,
    QueueMessage,
    QueueOptions,
    WorkQueue,
    load_queue_settings,
    open_work_queue,
)
from agent.backends.workqueue_config import QueueAddress, address
from agent.errors import ConfigError, PermanentBackendError, SkyferryError, TransientBackendError
from tests.kits import emulators
from tests.kits.emulators import Emulator, Queues, moto_checks_credentials
from tests.kits.site import free_port, render_toml

# The queue fixtures (tests/conftest.py brings the object-store ones and `moto`).
azurite_queue = emulators.azurite_queue
make_queues = emulators.make_queues

KINDS = ["azurite", "moto"]
LEASE = 1.0
MakeQueues = Callable[[str], Queues]


async def receive_all(q: WorkQueue, n: int, lease_s: float = 5.0) -> list[QueueMessage]:
    """Exactly the n messages sent (a service may hand them out over several receives)."""
    got: list[QueueMessage] = []
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        got += await q.receive(10, lease_s, wait_s=0.5)
    assert len(got) == n, f"received {len(got)} of {n} messages"
    return got


async def after_lease(start: float, lease_s: float = LEASE) -> None:
    """Sleep until a lease taken at `start` has surely run out."""
    await asyncio.sleep(max(0.0, start + lease_s + 0.3 - time.monotonic()))


def azure_peek(qs: Queues) -> list[Any]:
    """The messages of an Azurite queue, as its SDK sees them (not received)."""
    from azure.storage.queue import QueueClient

    account, queue = qs.url.removeprefix("azqueue://").split("/")
    client = QueueClient(str(qs.table["endpoint"]), queue,
                         credential={"account_name": account, "account_key": AZURITE_KEY})
    return list(client.peek_messages(max_messages=32))


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and text, f"not one line: {text!r}"
    return text


@pytest.mark.parametrize("kind", KINDS)
async def test_send_receive_delete_round_trip(kind: str, make_queues: MakeQueues) -> None:
    qs = make_queues(kind)
    q = qs.open()
    big = ("日本語 ✓ é " * 10_000).encode()[:MAX_BODY_BYTES].decode("utf-8", "ignore")
    big += "x" * (MAX_BODY_BYTES - len(big.encode()))  # exactly the limit, mostly multi-byte
    bodies = ["héllo ✓ 😀 — Ελληνικά", json.dumps({"manifest": "site-a/2026/01/m.json"}), big]
    try:
        for body in bodies:
            await q.send(body)
        if kind == "azurite":  # Azure's default is to drop a message after 7 days
            assert {m.expires_on.year for m in azure_peek(qs)} == {9999}
        got = await receive_all(q, 3)
        assert sorted(m.body for m in got) == sorted(bodies)
        assert [m.receive_count for m in got] == [1, 1, 1]
        assert len({m.id for m in got}) == 3
        for m in got:  # that they are gone, not hidden, is shown after a lease below
            await q.delete(m)
    finally:
        await q.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_refused_bodies(kind: str, make_queues: MakeQueues) -> None:
    q = make_queues(kind).open()
    try:
        for body, why in (("x" * (MAX_BODY_BYTES + 1), "bytes"), ("a\x00b", "U+0000")):
            with pytest.raises(PermanentBackendError) as e:
                await q.send(body)
            assert why in one_line(e.value) and q.url in str(e.value)
        assert await q.receive(10, LEASE, wait_s=0) == []
    finally:
        await q.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_lease_hides_until_it_runs_out_then_the_message_returns(
        kind: str, make_queues: MakeQueues) -> None:
    qs = make_queues(kind)
    a, b = qs.open(), qs.open()  # two workers
    lease = 2 * LEASE  # room for a loaded machine between the two receives
    try:
        assert await b.receive(10, LEASE, wait_s=0) == []  # connected before the clock starts
        await a.send("work item")
        start = time.monotonic()
        [first] = await a.receive(10, lease, wait_s=1)
        assert first.receive_count == 1
        assert await b.receive(10, LEASE, wait_s=0.3) == []
        await after_lease(start, lease)
        retake = time.monotonic()
        [again] = await b.receive(10, LEASE, wait_s=1)
        assert (again.id, again.body, again.receive_count) == (first.id, "work item", 2)
        if kind == "azurite":  # SQS may accept a stale receipt handle (docs of WorkQueue)
            with pytest.raises(LeaseLostError) as e:
                await a.extend(first, 5)
            assert first.id in one_line(e.value)
        await a.delete(first)  # its lease was lost and re-taken: no error
        await b.delete(again)
        await b.delete(again)  # gone already: no error either
        await after_lease(retake)
        assert await a.receive(10, LEASE, wait_s=0.3) == []
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_extend_keeps_the_message_hidden_past_its_first_lease(
        kind: str, make_queues: MakeQueues) -> None:
    qs = make_queues(kind)
    a, b = qs.open(), qs.open()
    lease = 2 * LEASE  # room for a loaded machine between receive and extend
    try:
        assert await b.receive(10, LEASE, wait_s=0) == []  # connected before the clock starts
        await a.send("large object")
        start = time.monotonic()
        [msg] = await a.receive(1, lease, wait_s=1)
        await asyncio.sleep(0.3)
        longer = await a.extend(msg, 2 * lease)
        assert (longer.id, longer.body, longer.receive_count) == (msg.id, msg.body, 1)
        await after_lease(start, lease)  # the first lease is over
        assert await b.receive(10, LEASE, wait_s=0.3) == []
        longer = await a.extend(longer, 3)  # a receipt from extend extends again
        await a.delete(longer)
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_dead_letter_moves_the_message_with_its_reason(
        kind: str, make_queues: MakeQueues) -> None:
    qs = make_queues(kind)
    q, dead = qs.open(), qs.open_dead()
    try:
        await q.send("manifest ✓")
        start = time.monotonic()
        [msg] = await q.receive(1, LEASE, wait_s=1)
        reason = "manifest site-a/m.json: signature does not verify"
        await q.dead_letter(msg, reason)
        [record] = await dead.receive(10, 30, wait_s=1)
        assert json.loads(record.body) == {"body": "manifest ✓", "reason": reason,
                                           "receive_count": 1, "id": msg.id}
        await after_lease(start)
        assert await q.receive(10, LEASE, wait_s=0.3) == []  # deleted from the work queue
    finally:
        await q.aclose()
        await dead.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_receive_with_nothing_there_returns_empty_within_wait(
        kind: str, make_queues: MakeQueues) -> None:
    q = make_queues(kind).open()
    try:
        assert await q.receive(10, LEASE, wait_s=0) == []  # connected (a client's first call)
        for wait in (0.0, 0.8):
            start = time.monotonic()
            assert await q.receive(10, LEASE, wait_s=wait) == []
            took = time.monotonic() - start
            assert wait - 0.1 <= took <= wait + 1.5, (wait, took)  # slack: a loaded machine
    finally:
        await q.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_bad_credentials_fail_with_one_clear_line(
        kind: str, make_queues: MakeQueues, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    qs = make_queues(kind)
    start = time.monotonic()
    if kind == "azurite":
        wrong = tmp_path / "wrong.key"
        wrong.write_text("A" * 86 + "==\n")
        wrong.chmod(0o600)
        q = qs.open(account_key_file=str(wrong))
        with pytest.raises(PermanentBackendError) as e:
            await q.send("x")
    else:
        em: Emulator = request.getfixturevalue("moto")
        q = qs.open()
        with moto_checks_credentials(em), pytest.raises(PermanentBackendError) as e:
            await q.send("x")
    await q.aclose()
    line = one_line(e.value)
    assert e.value.kind == "auth" and qs.url in line and "check the credentials" in line, line
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("kind", KINDS)
async def test_unreachable_endpoint_fails_with_one_clear_line(
        kind: str, make_queues: MakeQueues) -> None:
    qs = make_queues(kind)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    endpoint = f"{closed}/devstoreaccount1" if kind == "azurite" else closed
    q = qs.open(endpoint=endpoint, connect_timeout="1s", retries=0)
    start = time.monotonic()
    with pytest.raises(TransientBackendError) as e:
        await q.receive(1, LEASE, wait_s=0)
    await q.aclose()
    line = one_line(e.value)
    assert e.value.kind == "connection" and closed in line and qs.url in line, line
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("kind", KINDS)
async def test_missing_queue_says_to_create_it(kind: str, make_queues: MakeQueues) -> None:
    qs = make_queues(kind)
    url = qs.url + "-none"
    q = qs.open(url=url)
    with pytest.raises(PermanentBackendError) as e:
        await q.send("x")
    await q.aclose()
    line = one_line(e.value)
    assert e.value.kind == "not_found" and url in line and "create it" in line, line


@pytest.mark.parametrize("kind", KINDS)
async def test_other_credential_and_url_forms_reach_the_same_queue(
        kind: str, make_queues: MakeQueues, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    qs = make_queues(kind)
    if kind == "azurite":
        from azure.storage.queue import QueueSasPermissions, generate_queue_sas

        endpoint = str(qs.table["endpoint"])
        account, queue = qs.url.removeprefix("azqueue://").split("/")
        conn = tmp_path / "conn"
        conn.write_text(f"DefaultEndpointsProtocol=http;AccountName={account};"
                        f"AccountKey={AZURITE_KEY};QueueEndpoint={endpoint};\n")
        conn.chmod(0o600)
        sas = generate_queue_sas(account, queue, AZURITE_KEY,
                                 QueueSasPermissions(read=True, add=True, process=True),
                                 expiry=datetime.now(UTC) + timedelta(hours=1))
        monkeypatch.setenv("SKYFERRY_TEST_QUEUE_SAS", sas)
        sender = qs.open(account_key_file=None, endpoint=None, connection_string_file=str(conn))
        receiver = qs.open(account_key_file=None, sas_token_env="SKYFERRY_TEST_QUEUE_SAS")
    else:
        monkeypatch.setenv("SKYFERRY_TEST_QUEUE_KEY_ID", "test")
        account, queue = qs.url.removeprefix("sqs://us-east-1/").split("/")
        http_url = f"{qs.table['endpoint']}/{account}/{queue}"  # the queue's own URL
        sender = qs.open(url=http_url, endpoint=None, region="us-east-1")
        receiver = qs.open(access_key_id=None, access_key_id_env="SKYFERRY_TEST_QUEUE_KEY_ID")
    try:
        await sender.send("via another form")
        [msg] = await receiver.receive(1, 5, wait_s=1)
        assert msg.body == "via another form"
        await receiver.delete(msg)
    finally:
        await sender.aclose()
        await receiver.aclose()


@pytest.mark.parametrize("table, problem", [
    ({"url": "azqueue://acct/work", "dead_letter": "dead", "account_key": "c2VjcmV0"},
     "queue.account_key: secrets are not accepted inline"),
    ({"url": "azqueue://acct/work", "dead_letter": "dead"}, "needs a credential"),
    ({"url": "azqueue://acct/work", "account_key_env": "K"}, "queue.dead_letter: required"),
    ({"url": "azqueue://acct/Work_1", "dead_letter": "d", "account_key_env": "K"},
     "not name a valid Azure queue"),
    ({"url": "azqueue://acct/work", "dead_letter": "dead-q", "account_key_env": "K",
      "region": "us-east-1"}, "queue.region: does not apply to azqueue://"),
    ({"url": "azqueue://acct/work", "dead_letter": "azqueue://other/dead",
      "account_key_env": "K"}, "in storage account other, not acct"),
    ({"url": "sqs://us-east-1/123456789012/w.fifo", "dead_letter": "d"}, "FIFO"),
    ({"url": "sqs://us-east-1/1234/w", "dead_letter": "d"}, "12-digit AWS account id"),
    ({"url": "sqs://us-east-1/123456789012/w", "dead_letter": "d", "access_key_id": "AK"},
     "an access key id and its secret go together"),
    ({"url": "sqs://us-east-1/123456789012/w", "dead_letter": "d",
      "endpoint": "http://127.0.0.1:9"}, "allow_http is false"),
    ({"url": "https://q.example.net/123456789012/w", "dead_letter": "d"},
     "does not name the queue's region"),
    ({"url": "https://acct.queue.core.windows.net/work", "dead_letter": "d"},
     "write azqueue://acct/work"),
    ({"url": "sqs://us-east-1/123456789012/w", "dead_letter": "d", "visibility": "30s"},
     "queue.visibility: unknown key"),
])
def test_queue_table_problems_are_one_line_each(table: dict[str, object], problem: str,
                                                tmp_path: Path) -> None:
    path = tmp_path / "land.toml"
    path.write_text(render_toml({"queue": table}))
    with pytest.raises(ConfigError) as e:
        load_queue_settings(path)
    assert any(problem in p for p in e.value.problems), e.value.problems
    assert "c2VjcmV0" not in str(e.value)  # an inline secret is never echoed


@pytest.mark.parametrize("url, options, expect", [
    ("https://sqs.eu-west-1.amazonaws.com/123456789012/work", QueueOptions(),
     ("sqs", "eu-west-1", "https://sqs.eu-west-1.amazonaws.com/123456789012/work", None)),
    ("sqs://cn-north-1/123456789012/work", QueueOptions(),
     ("sqs", "cn-north-1", "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/work", None)),
    ("sqs://us-east-1/123456789012/work", QueueOptions(endpoint="http://127.0.0.1:5000"),
     ("sqs", "us-east-1", "http://127.0.0.1:5000/123456789012/work", "http://127.0.0.1:5000")),
    ("https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com/123456789012/w",
     QueueOptions(region="eu-west-1"),
     ("sqs", "eu-west-1", "https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com/123456789012/w",
      "https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com")),
    ("azqueue://acct/work", QueueOptions(),
     ("azqueue", None, "https://acct.queue.core.windows.net/work",
      "https://acct.queue.core.windows.net")),
])
def test_queue_urls_resolve_to_the_service_endpoints(
        url: str, options: QueueOptions, expect: tuple[str, str | None, str, str | None]) -> None:
    found = address(url, options)
    assert isinstance(found, QueueAddress), found
    assert (found.service, found.region, found.queue_url, found.endpoint) == expect


def test_opening_reads_secrets_but_sends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "land.toml"
    path.write_text(render_toml({"queue": {
        "url": "sqs://eu-west-1/123456789012/work", "dead_letter": "dead",
        "access_key_id": "AKIDEXAMPLE", "secret_access_key_env": "SKYFERRY_NO_SUCH_VAR"}}))
    s = load_queue_settings(path)
    with pytest.raises(SkyferryError) as e:
        open_work_queue(s.url, s.options, environ={})
    assert "SKYFERRY_NO_SUCH_VAR" in one_line(e.value)
    # The default credential chain is looked up at the first call: opening needs nothing.
    q = open_work_queue(s.url, replace(s.options, access_key_id=None, secret_access_key=None),
                        environ={})
    assert q.url == s.url
    asyncio.run(q.aclose())
    with pytest.raises(SkyferryError) as e:
        open_work_queue("azqueue://acct/work", s.options, environ={})
    assert "no credential" in one_line(e.value)
