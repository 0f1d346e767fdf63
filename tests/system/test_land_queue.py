# ruff: noqa: F811  (pytest fixtures are imported and then taken as parameters)
"""`skyferry land` scaled out on a work queue (issue 16, acceptance 3, the exactly-once part of 1
and 6): real worker processes on Azurite's Storage Queue and moto's SQS, killed with SIGKILL
while they land; notification mode fed with the services' own event formats; newest-wins per
name with several workers; dead-lettering; pending markers of live workers left alone.

The sealed store is a folder of real sealed, signed objects (tests/kits/restore.py) except in
notification mode, where it is a container or bucket (the events name its blobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlsplit

import pytest

from agent.backends.protocol import Backend
from agent.backends.registry import open_backend
from agent.backends.workqueue import QueueMessage, WorkQueue
from agent.cloud import land_book as book
from agent.cloud.land import Lander, LandReport
from agent.cloud.land_notify import work_item
from agent.cloud.land_recover import recover_events
from agent.cloud.restore import site_key_loader
from agent.errors import TransientBackendError
from tests.kits import emulators
from tests.kits.emulators import Cloud as Store
from tests.kits.emulators import Queues, azurite, make_cloud, moto  # noqa: F401 (fixtures)
from tests.kits.landq import (
    BIG,
    LEASE_S,
    Watcher,
    Workers,
    event_keys,
    holding,
    land_config,
    listing,
    publish_corpus,
    takeovers,
    wait_landed,
)
from tests.kits.restore import MTIME_NS, Cloud, cloud, keys, run_cli  # noqa: F401

azurite_queue = emulators.azurite_queue
make_queues = emulators.make_queues
MakeQueues = Callable[[str], Queues]


async def drain(q: WorkQueue, wait_s: float = 1.0) -> list[QueueMessage]:
    got: list[QueueMessage] = []
    while batch := await q.receive(10, 30, wait_s=wait_s):
        got += batch
    await q.aclose()
    return got


@pytest.mark.parametrize("kind", ["azurite", "moto"])
def test_four_workers_killed_ten_times_land_every_file_exactly_once(
        cloud: Cloud, make_cloud: Callable[..., Store], make_queues: MakeQueues,
        tmp_path: Path, kind: str) -> None:
    rng = random.Random(f"kills-{kind}")
    want, manifests = publish_corpus(cloud, 30, rng)
    store, queues = make_cloud(kind), make_queues(kind)
    dest = store.backend()
    cfg = land_config(tmp_path / "land.toml", {"url": cloud.url}, store.table,
                      cloud.keys.recipient_key, tmp_path, queues.table)
    workers = Workers(cfg, tmp_path / "logs")
    watcher = Watcher(dest, want)
    watcher.start()
    workers.start(4)
    try:
        deadline = time.monotonic() + 60
        while workers.kills < 10 and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.1, 0.4))
            busy = holding(workers)  # a random one of those landing something
            if busy:
                workers.kill(rng.choice(busy))
                workers.start(1)
        landed_at_last_kill = len(listing(dest, "_skyferry/landed/"))
        wait_landed(dest, len(manifests), workers, 120)
    finally:
        watcher.done.set()
        watcher.join(10)
        workers.stop()
    assert workers.kills == 10, "workers held messages to kill"
    assert landed_at_last_kill < len(manifests), "the kills came while landing"
    assert not workers.failures(), workers.failures()
    assert not watcher.bad, watcher.bad[:5]
    assert watcher.polls >= 10 and len(watcher.seen) == len(want), (watcher.polls,
                                                                   len(watcher.seen))
    objects = listing(dest)
    assert {k: v for k, v in objects.items() if not k.startswith("_skyferry/")} == {
        k: len(v) for k, v in want.items()}
    for key in rng.sample(sorted(want), 20) + [k for k in want if "/big/" in k]:
        assert asyncio.run(dest.get(key)) == want[key], key
    assert event_keys(dest) == Counter(want.keys()), "exactly one event per file"
    gaps = takeovers(workers)
    assert gaps, "no kill hit a worker holding a message"
    assert min(gaps) >= LEASE_S - 0.5, f"taken over before the lease ran out: {gaps}"
    assert asyncio.run(drain(queues.open_dead(), 0.2)) == [], "nothing was dead-lettered"


def test_the_lease_is_extended_while_a_big_file_lands(
        cloud: Cloud, make_cloud: Callable[..., Store], make_queues: MakeQueues,
        tmp_path: Path) -> None:
    """A 9 MiB file through a link capped at 2 MB/s takes several 1 s leases to land: the
    worker extends its lease all along, so the message is never visible to another receiver,
    and it is deleted once landed."""
    data = random.Random(3).randbytes(BIG)
    cloud.publish("big/slow.bin", data)
    store, queues = make_cloud("moto", proxy=True), make_queues("moto")
    assert store.proxy is not None
    store.proxy.rate_bps = 2e6
    cfg = land_config(tmp_path / "land.toml", {"url": cloud.url}, store.table,
                      cloud.keys.recipient_key, tmp_path, queues.table, lease_s=1.0)
    workers = Workers(cfg, tmp_path / "logs")
    workers.start(1)
    stolen: list[QueueMessage] = []

    async def try_to_steal() -> None:
        q, b = queues.open(), store.backend()
        while not [i async for i in b.list("_skyferry/landed/")]:
            stolen.extend(await q.receive(10, 1.0, wait_s=0.3))
        await q.aclose()

    try:
        workers.wait_for("land_received")
        began = time.monotonic()
        asyncio.run(try_to_steal())
        took = time.monotonic() - began
        wait_landed(store.backend(), 1, workers, 30)
        # The message is deleted after the landing record is made: stopped before that, the
        # worker never logs it (a fresh clone under load).
        workers.wait_for("land_message_done")
    finally:
        workers.stop()
    assert took > 3, f"landing took {took:.1f} s: not several leases long"
    assert stolen == [], "another receiver got the message while it was being landed"
    lines = workers.all[0].lines()
    assert [e["receives"] for e in lines if e.get("event") == "land_received"] == [1]
    assert any(e.get("event") == "land_message_done" for e in lines)
    assert not [e for e in lines if e.get("event") in ("land_lease_lost", "land_extend_failed")]
    assert asyncio.run(store.backend().get(f"{cloud.site}/files/big/slow.bin")) == data
    assert asyncio.run(drain(queues.open(), 0.2)) == [], "deleted once landed"


@pytest.mark.parametrize("kind", ["azurite", "moto"])
def test_poison_messages_end_in_the_dead_letter_queue_with_their_reason(
        cloud: Cloud, make_cloud: Callable[..., Store], make_queues: MakeQueues,
        tmp_path: Path, kind: str) -> None:
    store, queues = make_cloud(kind), make_queues(kind)
    cfg = land_config(tmp_path / "land.toml", {"url": cloud.url}, store.table,
                      cloud.keys.recipient_key, tmp_path, queues.table)
    text = cfg.read_text().replace("max_receives = 10", "max_receives = 2")
    cfg.write_text(text)
    stuck = "camp-alpha/manifests/2026/12/05/0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    cloud.root.mkdir(parents=True)  # an empty sealed store

    async def prepare() -> None:
        q = queues.open()
        await q.send("this is not a work item")
        await q.send(work_item(stuck))
        # Two receives by workers that died holding it (their lease ran out).
        for _ in range(2):
            got: list[QueueMessage] = []
            while not any(m.body == work_item(stuck) for m in got):
                got += await q.receive(10, 1.0, wait_s=2)
            await asyncio.sleep(1.3)
        await q.aclose()

    asyncio.run(prepare())
    workers = Workers(cfg, tmp_path / "logs")
    workers.start(1)
    try:
        deadline = time.monotonic() + 20
        dead: list[QueueMessage] = []
        while len(dead) < 2 and time.monotonic() < deadline:
            dead += asyncio.run(drain(queues.open_dead(), 0.5))
    finally:
        workers.stop()
    assert not workers.failures(), workers.failures()
    letters = {json.loads(m.body)["body"]: json.loads(m.body) for m in dead}
    assert set(letters) == {"this is not a work item", work_item(stuck)}, letters
    assert "not JSON" in letters["this is not a work item"]["reason"]
    assert "received 3 times" in letters[work_item(stuck)]["reason"]
    assert letters[work_item(stuck)]["receive_count"] == 3
    assert asyncio.run(drain(queues.open(), 0.2)) == [], "dead-lettered messages are deleted"


def event_grid_created(container: str, blob: str) -> str:
    return json.dumps({
        "topic": "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Storage/"
                 "storageAccounts/devstoreaccount1",
        "subject": f"/blobServices/default/containers/{container}/blobs/{blob}",
        "eventType": "Microsoft.Storage.BlobCreated", "id": os.urandom(8).hex(),
        "data": {"api": "PutBlob", "blobType": "BlockBlob", "contentLength": 1,
                 "url": f"http://127.0.0.1/devstoreaccount1/{container}/{blob}"},
        "dataVersion": "", "metadataVersion": "1", "eventTime": datetime.now(UTC).isoformat()})


def s3_created(bucket: str, keys: list[str]) -> str:
    return json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": datetime.now(UTC).isoformat(), "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket},
               "object": {"key": quote_plus(k, safe="/"), "size": 1}}} for k in keys]})


def upload(src: Backend, cloud: Cloud, since: set[str]) -> list[str]:
    """Copy the sealed folder's objects not in `since` into the source bucket; their keys."""
    new = sorted(p.relative_to(cloud.root).as_posix() for p in cloud.root.rglob("*")
                 if p.is_file() and p.relative_to(cloud.root).as_posix() not in since)

    async def go() -> None:
        for k in new:
            await src.put_if_absent(k, (cloud.root / k).read_bytes())

    asyncio.run(go())
    return new


async def notify(q: WorkQueue, kind: str, place: tuple[str, str], keys: list[str]) -> int:
    """Each new object's event, as the service delivers it (chunks' included); how many
    messages that was."""
    container, prefix = place
    if kind == "azurite":  # one event per message; the adapter base64-encodes, as Event Grid
        for k in keys:
            await q.send(event_grid_created(container, f"{prefix}/{k}"))
        return len(keys)
    for i in range(0, len(keys), 5):
        await q.send(s3_created(container, [f"{prefix}/{k}" for k in keys[i:i + 5]]))
    await q.send(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent",
                             "Bucket": container}))
    return (len(keys) + 4) // 5 + 1


@pytest.mark.parametrize("kind", ["azurite", "moto"])
def test_notification_mode_lands_what_the_services_events_name_and_switching_modes_keeps_it_once(
        cloud: Cloud, make_cloud: Callable[..., Store], make_queues: MakeQueues,
        tmp_path: Path, kind: str) -> None:
    rng = random.Random(f"notify-{kind}")
    src_store, store, queues = make_cloud(kind, prefix="sealed"), make_cloud(kind), \
        make_queues(kind)
    src, dest = open_backend_of(src_store), store.backend()
    place = (urlsplit(src_store.url).netloc, "sealed")
    first, _ = publish_corpus(cloud, 6, rng)
    sent = set(upload(src, cloud, set()))
    cfg = land_config(tmp_path / "land.toml", src_store.table, store.table,
                      cloud.keys.recipient_key, tmp_path, queues.table,
                      discovery="notification", backfill="1h")
    # 1. Listing (--once) lands what is there.
    assert run_cli("land", "-c", str(cfg), "--once", "--json").report["files"] == len(first)
    # 2. Notification mode, two workers: only the events name the new manifests.
    second = {f"{cloud.site}/files/n/{i}.txt": rng.randbytes(100 + i) for i in range(8)}
    workers = Workers(cfg, tmp_path / "logs")
    workers.start(2)
    try:
        workers.wait_for("land_backfill")  # their start-up backfill found nothing new
        for name, data in second.items():
            cloud.publish(name.split("/", 2)[2], data)
        new = upload(src, cloud, sent)
        sent |= set(new)
        messages = asyncio.run(notify(queues.open(), kind, place, new + sorted(sent)[:5]))
        wait_landed(dest, 6 + 3 + 1 + len(second), workers, 30)
        # Landed is not the end: the events of chunks and repeats are dropped after that.
        deadline = time.monotonic() + 30
        while sum(e.get("event") == "land_message_done" for w in workers.all
                  for e in w.lines()) < messages:
            assert time.monotonic() < deadline, "the workers did not get through the messages"
            time.sleep(0.2)
        queued = [e for w in workers.all for e in w.lines() if e.get("event") == "land_queued"]
    finally:
        workers.stop()
    assert not queued, "the lister queued nothing: the events alone named the new manifests"
    # 3. Back to listing: a third batch lands, nothing lands twice.
    third = {f"{cloud.site}/files/l/{i}.txt": rng.randbytes(50 + i) for i in range(3)}
    for name, data in third.items():
        cloud.publish(name.split("/", 2)[2], data)
    upload(src, cloud, sent)
    again = run_cli("land", "-c", str(cfg), "--once", "--json").report
    assert again["files"] == len(third), again
    want = {**first, **second, **third}
    objects = listing(dest)
    assert {k for k in objects if not k.startswith("_skyferry/")} == set(want)
    for key, data in want.items():
        assert asyncio.run(dest.get(key)) == data, key
    assert event_keys(dest) == Counter(want.keys()), "exactly one event per file"
    assert asyncio.run(drain(queues.open(), 0.2)) == [], "every message was deleted"
    assert asyncio.run(drain(queues.open_dead(), 0.2)) == [], "chunks' events are dropped"


def open_backend_of(store: Store) -> Backend:
    from agent.backends.config import load_backend_settings

    return open_backend(load_backend_settings(store.write_config()))


@pytest.mark.parametrize("kind", ["azurite", "moto"])
def test_newest_version_wins_with_three_workers_and_manifests_newest_first(
        cloud: Cloud, make_cloud: Callable[..., Store], make_queues: MakeQueues,
        tmp_path: Path, kind: str) -> None:
    store, queues = make_cloud(kind), make_queues(kind)
    dest = store.backend()
    cfg = land_config(tmp_path / "land.toml", {"url": cloud.url}, store.table,
                      cloud.keys.recipient_key, tmp_path, queues.table,
                      discovery="notification", backfill="1h")
    names = [f"report-{n}.csv" for n in range(8)]
    versions = {n: [cloud.manifest(n, f"{n} version {v}\n".encode() * (v + 1) * 40,
                                   mtime_ns=MTIME_NS + v * 10**9) for v in range(3)]
                for n in names}
    workers = Workers(cfg, tmp_path / "logs")
    workers.start(3)
    try:
        workers.wait_for("land_backfill")  # their start-up backfill found an empty store

        async def send_newest_first() -> None:
            q = queues.open()
            for v in (2, 1, 0):
                for n in names:
                    await q.send(work_item(cloud.put_manifest(versions[n][v])))
            await q.aclose()

        asyncio.run(send_newest_first())
        wait_landed(dest, len(names) * 3, workers, 30)
    finally:
        workers.stop()
    assert not workers.failures(), workers.failures()
    for n in names:
        key = f"{cloud.site}/files/{n}"
        assert asyncio.run(dest.get(key)) == f"{n} version 2\n".encode() * 120, key
        held = asyncio.run(dest.head(key))
        assert held is not None and held[1]["mtime"] == str(MTIME_NS + 2 * 10**9)
        record = json.loads(asyncio.run(dest.get(book.name_key(cloud.site, f"files/{n}"))))
        assert record["object_id"] == versions[n][2].object_id


def lander(cloud: Cloud, dest: Backend, tmp_path: Path) -> Lander:
    return Lander(open_backend(cloud.url), dest, cloud.keys.recipient,
                  site_key_loader(cloud.keys.recipient_key.parent), tmp_path)


def test_an_older_versions_late_put_is_repaired_when_its_manifest_comes_again(
        cloud: Cloud, make_cloud: Callable[..., Store], tmp_path: Path) -> None:
    """Worker A claims the name for v0 and starts a slow put; B claims it for v2 and lands it;
    A's put finishes last, then A is killed. A's message comes back: its landing finds v2's
    record and puts v2's content back (from the record's manifest). An object store: on a
    folder the version is judged and the file renamed under one lock (`GuardedPut`), so no
    late put of an older version can come after."""
    old, new = (cloud.manifest("r.csv", f"v{v}\n".encode() * (v + 1), mtime_ns=MTIME_NS + v)
                for v in (0, 2))
    old_key, new_key = cloud.put_manifest(old), cloud.put_manifest(new)
    dest = make_cloud("moto").backend()
    a = lander(cloud, dest, tmp_path)

    async def scenario() -> None:
        await a.land_manifest(info(new_key), LandReport())
        late = book.Landed(f"{cloud.site}/files/r.csv", 3, "x", MTIME_NS, cloud.site, "files",
                           old.object_id, old.created)
        await dest.put_plain(late.key, b"v0\n", metadata=late.metadata())
        report = LandReport()
        await a.land_manifest(info(old_key), report)
        assert report.superseded == 1 and report.files == 0
        assert await dest.get(late.key) == b"v2\n" * 3

    asyncio.run(scenario())


def test_on_a_folder_a_version_is_judged_by_what_the_file_holds(cloud: Cloud,
                                                                  tmp_path: Path) -> None:
    """A folder destination keeps no name records (`GuardedPut`): the landed file's own
    `version` attribute is what a later version is judged against, under its folder's lock.
    The newest landed first, an older one after is superseded; a foreign file without a
    version at the name is replaced; a newer one after replaces it."""
    v = [cloud.manifest("r.csv", f"v{i}\n".encode() * (i + 1), mtime_ns=MTIME_NS + i)
         for i in range(4)]
    keys = [cloud.put_manifest(m) for m in v]
    lake = tmp_path / "lake"
    dest = open_backend(f"file://{lake}")
    a = lander(cloud, dest, tmp_path)
    target = lake / cloud.site / "files" / "r.csv"

    async def land(i: int) -> LandReport:
        report = LandReport()
        await a.land_manifest(info(keys[i]), report)
        return report

    assert asyncio.run(land(2)).files == 1
    held = json.loads(os.getxattr(target, "user.skyferry.version"))
    assert held["object_id"] == v[2].object_id
    late = asyncio.run(land(0))
    assert late.superseded == 1 and late.files == 0
    assert target.read_bytes() == b"v2\n" * 3
    target.unlink()
    target.write_bytes(b"someone else's file")  # no version attribute: replaced
    assert asyncio.run(land(1)).files == 1 and target.read_bytes() == b"v1\n" * 2
    assert asyncio.run(land(3)).files == 1 and target.read_bytes() == b"v3\n" * 4
    assert not (lake / "_skyferry" / "names").exists()
    assert target.stat().st_mtime_ns == MTIME_NS + 3


def test_a_failed_pass_is_one_line_and_the_service_stays_up(
        cloud: Cloud, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The sealed store does not answer for a while (its listing fails, as after the retries
    give up): each failed pass is one warning, the lander keeps running and tries the backfill
    again soon, and once the store answers what it holds lands."""
    published = cloud.publish("a.txt", b"alpha")
    lake = tmp_path / "lake"
    a = lander(cloud, open_backend(f"file://{lake}"), tmp_path)
    real_backfill = a.discovery.backfill
    failures = 3

    async def backfill() -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise TransientBackendError(f"{cloud.url}: list: connection refused (test)",
                                        "connection")
        return await real_backfill()

    a.discovery.backfill = backfill  # type: ignore[method-assign]

    def recorded() -> bool:
        return any(published.manifest.object_id in p.name
                   for p in (lake / "_skyferry" / "landed").rglob("*"))

    async def scenario() -> None:
        task = asyncio.create_task(a.run(poll_s=0.05, backfill_s=30))
        target = lake / cloud.site / "files" / "a.txt"
        try:
            # The file lands first, its landing record after it: wait for the record, or the
            # lander may be stopped in between (seen on a loaded machine).
            deadline = time.monotonic() + 10
            while not recorded() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not task.done(), task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert target.read_bytes() == b"alpha"

    with caplog.at_level(logging.WARNING, logger="skyferry.land"):
        asyncio.run(scenario())
    failed = [r for r in caplog.records if getattr(r, "event", "") == "land_pass_failed"]
    assert len(failed) == 3 and all("connection refused" in r.getMessage() for r in failed)
    assert recorded()


def info(key: str) -> Any:
    from agent.backends.protocol import ObjectInfo

    return ObjectInfo(key, 0)


def test_recovery_leaves_a_live_workers_marker_alone(cloud: Cloud, tmp_path: Path) -> None:
    dest = open_backend(f"file://{tmp_path / 'lake'}")
    lake = tmp_path / "lake"
    published = cloud.publish("a.txt", b"alpha")
    asyncio.run(lander(cloud, dest, tmp_path).land_manifest(info(published.key), LandReport()))
    (events_file,) = (lake / "_skyferry" / "events").rglob("*.jsonl")
    events_file.unlink()  # as if its writer stopped between the record and the events
    oid = published.manifest.object_id
    now = datetime.now(UTC)

    def marker(name: str, oid: str, age: timedelta) -> Path:
        path = lake / "_skyferry" / "pending" / cloud.site / f"{oid}.{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"manifest": "k", "at": (now - age).isoformat()}))
        return path

    live_landed = marker("live", oid, timedelta(seconds=1))
    live_unlanded = marker("live", "0193a1b2-0000-7000-8000-000000000000", timedelta(seconds=1))
    stale_unlanded = marker("gone", "0193a1b2-0000-7000-8000-000000000001",
                            timedelta(minutes=30))
    asyncio.run(recover_events(dest, None, min_age_s=6, orphan_s=3600))
    assert live_landed.exists() and live_unlanded.exists() and stale_unlanded.exists()
    assert not events_file.exists(), "a marker younger than min_age is not looked at"
    dead = marker("dead", oid, timedelta(seconds=30))
    assert asyncio.run(recover_events(dest, None, min_age_s=6, orphan_s=3600)) == 1
    assert not dead.exists() and events_file.exists(), "its record's events, written once"
    assert stale_unlanded.exists(), "no record: removed only once orphaned"
    assert asyncio.run(recover_events(dest, None, min_age_s=6, orphan_s=600)) == 0
    assert not stale_unlanded.exists() and live_unlanded.exists()



def test_bad_queue_and_events_settings_get_one_clear_line(cloud: Cloud, tmp_path: Path) -> None:
    cloud.root.mkdir(parents=True)
    base = {"source": {"url": cloud.url}, "dest": {"url": f"file://{tmp_path / 'lake'}"}}
    cases = [
        ({"land": {"key": "k", "discovery": "notification"}}, "needs a [queue]"),
        ({"land": {"key": "k"}, "queue": {"url": "azqueue://acct/q", "dead_letter": "q-dead",
                                          "account_key_file": "/k", "lease": "0s"}},
         "queue.lease"),
        ({"land": {"key": "k"}, "queue": {"url": "sqs://us-east-1/123456789012/q",
                                          "dead_letter": "d", "max_receives": 0}},
         "queue.max_receives"),
        ({"land": {"key": "k"}, "events": {"webhook": "ftp://x"}}, "events.webhook"),
        ({"land": {"key": "k"}, "events": {"mqtt_password": "s3cret"}}, "not accepted inline"),
    ]
    from tests.kits.site import render_toml

    for tables, expected in cases:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(render_toml({**base, **tables}))
        r = run_cli("land", "-c", str(cfg), "--once")
        assert r.returncode == 2 and expected in r.stderr, (tables, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "s3cret" not in r.stderr


def test_the_example_config_documents_a_queue() -> None:
    from agent.cloud.land_config import load_land_settings
    from tests.kits.restore import ROOT

    s = load_land_settings(ROOT / "config" / "land.toml")
    assert s.queue is not None and s.queue.queue.url.startswith("azqueue://")
    assert (s.queue.lease_s, s.queue.max_receives, s.discovery) == (30.0, 5, "listing")
    assert s.queue.queue.options.dead_letter and not s.events.enabled
