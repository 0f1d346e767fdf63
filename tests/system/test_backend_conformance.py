"""The contract every backend keeps, run against each real one: a folder, Azurite and moto.

Every test takes `backend_kind` and runs once per service through the same `Backend` protocol
(agent/backends/protocol.py): create-only writes, byte-identical reads, listings, errors
mapped to agent.errors' classes, and transient failures retried. A new service module adds its
emulator to KINDS and must pass all of it. The emulators start once per session
(tests/kits/emulators.py); each test gets its own container or bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import obstore
import pytest

from agent.backends.config import load_backend_settings
from agent.backends.protocol import Backend
from agent.backends.registry import open_backend
from agent.backends.retry import retrying
from agent.errors import (
    ObjectConflictError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PermanentBackendError,
    TransientBackendError,
)
from tests.kits.emulators import Cloud, Emulator, moto_checks_credentials

KINDS = ("file", "azurite", "moto")
# What only a service across a link can do: a folder backend creates its folder (no missing
# container) and has no link to fail.
REMOTE = ("azurite", "moto")
# A folder denies access only to a user without root's override of permissions.
REFUSING = REMOTE if os.geteuid() == 0 else ("file", *REMOTE)
PREFIX = "site/prefix"  # the URL's prefix on the emulators: keys must come back without it

MakeCloud = Callable[..., Cloud]


@pytest.fixture(params=KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fresh(make_cloud: MakeCloud, kind: str, **changes: object) -> tuple[Cloud, Backend]:
    """A new, empty container, bucket or folder, and a backend on it (through the URL prefix)."""
    cloud = make_cloud(kind, prefix="" if kind == "file" else PREFIX)
    return cloud, open_backend(load_backend_settings(cloud.write_config(
        {**cloud.table, **changes})))


def blob(n: int, seed: int = 0) -> bytes:
    """n bytes that differ at every offset from another seed's (a byte swap would show)."""
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


# ---- create-only put --------------------------------------------------------------------------


def test_put_is_create_only(make_cloud: MakeCloud, backend_kind: str) -> None:
    _, b = fresh(make_cloud, backend_kind)

    async def scenario() -> None:
        assert await b.put_if_absent("c/ab/abcd", blob(1000)) is True
        # Same key, same size: taken as an earlier attempt of this upload, nothing written.
        assert await b.put_if_absent("c/ab/abcd", blob(1000, seed=1)) is False
        assert (await b.put_new("c/ab/abcd", blob(1000, seed=1))).written is False
        assert await b.get("c/ab/abcd") == blob(1000), "a second put never overwrites"
        # Same key, another size: a foreign or damaged object, refused with the mapped error.
        with pytest.raises(ObjectConflictError, match="already exists with 1000 bytes") as info:
            await b.put_if_absent("c/ab/abcd", blob(999))
        assert info.value.kind == "conflict"
        assert await b.size("c/ab/abcd") == 1000
        assert await b.get("c/ab/abcd") == blob(1000)

    asyncio.run(scenario())


def test_probe_first_does_not_send_what_is_there(make_cloud: MakeCloud,
                                                 backend_kind: str) -> None:
    _, b = fresh(make_cloud, backend_kind)

    async def scenario() -> None:
        assert await b.put_if_absent("k", blob(10), probe_first=True) is True
        assert await b.put_if_absent("k", blob(10), probe_first=True) is False

    asyncio.run(scenario())


# ---- read-back --------------------------------------------------------------------------------


# Above 1 MiB Azure stages blocks; above 8 MiB (s3_multipart.THRESHOLD) S3 uploads parts.
@pytest.mark.parametrize("size", [1, 1000, (1 << 20) + 17, (9 << 20) + 5])
def test_read_back_is_byte_identical(make_cloud: MakeCloud, backend_kind: str,
                                     size: int) -> None:
    _, b = fresh(make_cloud, backend_kind)
    data = blob(size, seed=size) if size < 2 << 20 else random.Random(size).randbytes(size)

    async def scenario() -> None:
        result = await b.put_new("obj/data", data)
        assert result.written
        await b.verify_written("obj/data", size, result.etag)
        assert await b.size("obj/data") == size
        assert await b.get("obj/data") == data
        assert await b.get("obj/data", max_size=size) == data
        if size > 1:
            with pytest.raises(ObjectTooLargeError):
                await b.get("obj/data", max_size=size - 1)

    asyncio.run(scenario())


def test_delete_removes(make_cloud: MakeCloud, backend_kind: str) -> None:
    _, b = fresh(make_cloud, backend_kind)

    async def scenario() -> None:
        await b.put_if_absent("gone/soon", b"x")
        await b.delete("gone/soon")
        assert await b.size("gone/soon") is None
        assert [i async for i in b.list("gone/")] == []

    asyncio.run(scenario())


# ---- list -------------------------------------------------------------------------------------


def test_list_empty_many_and_by_prefix(make_cloud: MakeCloud, backend_kind: str) -> None:
    cloud, b = fresh(make_cloud, backend_kind)
    many = {f"m/{i:03d}/{i:x}": i + 1 for i in range(60)}
    others = {"n/one": 5, "mm/not-under-m-slash": 7}

    async def listing(prefix: str) -> dict[str, int]:
        return {i.key: i.size async for i in b.list(prefix)}

    async def scenario() -> None:
        assert await listing("") == {}, "a new store lists nothing"
        assert await listing("m/") == {}
        await asyncio.gather(*(b.put_if_absent(k, blob(n)) for k, n in
                               {**many, **others}.items()))
        assert await listing("m/") == many
        # Prefixes are folders: "m/" holds none of "mm/", "m/007/" one key.
        assert await listing("m/007/") == {"m/007/7": 8}
        assert await listing("n/") == {"n/one": 5}
        assert await listing("nothing/") == {}
        assert await listing("") == {**many, **others}

    asyncio.run(scenario())
    if backend_kind != "file":
        assert set(cloud.objects()) == {f"{PREFIX}/{k}" for k in {**many, **others}}, (
            "keys are stored under the URL's prefix and listed without it")


# ---- plain objects (what `land` delivers) ---------------------------------------------------

LANDED = {"mtime": "1700000000123456789", "sha256": "9f" * 32, "site": "site-1",
          "source": "cam_2", "object_id": "0123abcd", "manifest_created": "2026-12-05T11:00:00Z"}


def test_put_plain_bytes_head_and_replace(make_cloud: MakeCloud, backend_kind: str) -> None:
    cloud, b = fresh(make_cloud, backend_kind)
    mtime_ns = 1_700_000_000_123_456_789

    async def scenario() -> None:
        assert await b.head("s/cam/a b.txt") is None, "head of a missing key is None"
        await b.put_plain("s/cam/a b.txt", blob(1000), metadata=LANDED, mtime_ns=mtime_ns)
        assert await b.head("s/cam/a b.txt") == (1000, LANDED)
        assert await b.get("s/cam/a b.txt") == blob(1000)
        if backend_kind == "file":
            path = Path(cloud.url.removeprefix("file://"), "s", "cam", "a b.txt")
            assert path.stat().st_mtime_ns == mtime_ns
        # A second put_plain replaces content and metadata (none of the old names remain).
        await b.put_plain("s/cam/a b.txt", blob(700, seed=2), metadata={"sha256": "ab"})
        assert await b.head("s/cam/a b.txt") == (700, {"sha256": "ab"})
        assert await b.get("s/cam/a b.txt") == blob(700, seed=2)
        assert {i.key: i.size async for i in b.list("s/")} == {"s/cam/a b.txt": 700}
        with pytest.raises(PermanentBackendError, match="not portable") as info:
            await b.put_plain("s/cam/x", b"x", metadata={"Content-Type": "text/plain"})
        assert info.value.kind == "rejected"
        assert await b.head("s/cam/x") is None, "refused before anything was sent"
        if backend_kind == "file":  # a file where a folder must go, a folder where a file
            for key in ("s/cam/a b.txt/under", "s/cam"):
                with pytest.raises(PermanentBackendError, match="move it away"):
                    await b.put_plain(key, b"x", metadata={})

    asyncio.run(scenario())


def test_put_plain_large_file_is_never_seen_partly(make_cloud: MakeCloud, backend_kind: str,
                                                   tmp_path: Path) -> None:
    """12 MiB from a file: a multipart upload (8 MiB parts) on the services; a lister polling
    all along sees the key only complete, with its metadata."""
    cloud, b = fresh(make_cloud, backend_kind)
    data = random.Random(12).randbytes(12 << 20)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    seen: list[int] = []
    polls = 0

    async def lister(done: asyncio.Event) -> None:
        nonlocal polls
        while not done.is_set():
            seen.extend([i.size async for i in b.list("s/") if i.key == "s/big/file.bin"])
            polls += 1
            await asyncio.sleep(0.005)

    async def scenario() -> None:
        done = asyncio.Event()
        polling = asyncio.create_task(lister(done))
        await asyncio.sleep(0.02)
        before = polls
        await b.put_plain("s/big/file.bin", source, metadata={"sha256": "cd"}, mtime_ns=10**18)
        during = polls - before
        done.set()
        await polling
        assert set(seen) <= {len(data)}, f"a lister saw a partial object: sizes {set(seen)}"
        if backend_kind in REMOTE:
            assert during >= 2, f"the lister ran {during} times during the upload"
        assert await b.head("s/big/file.bin") == (len(data), {"sha256": "cd"})
        assert await b.get("s/big/file.bin") == data
        assert [i.key async for i in b.list("s/")] == ["s/big/file.bin"]

    asyncio.run(scenario())
    if backend_kind == "moto":  # S3 gives a multipart object the ETag "<md5 of md5s>-<parts>"
        etag = obstore.head(cloud.backend()._store,  # type: ignore[attr-defined]
                            f"{PREFIX}/s/big/file.bin")["e_tag"]
        assert etag is not None and etag.strip('"').endswith("-2"), etag
    if backend_kind == "file":
        root = Path(cloud.url.removeprefix("file://"))
        assert os.listdir(root / "s" / "big") == ["file.bin"], "no temporary file is left"
        assert (root / "s" / "big" / "file.bin").stat().st_mtime_ns == 10**18


# ---- compare-and-swap (the lander's name records) ------------------------------------------


def test_put_if_match_swaps_only_the_version_read(make_cloud: MakeCloud,
                                                  backend_kind: str) -> None:
    _, b = fresh(make_cloud, backend_kind)

    async def scenario() -> None:
        assert await b.get_tagged("n/rec") is None, "a missing object has no version"
        assert await b.put_if_match("n/rec", b"one", "no-such-tag") is False
        assert await b.put_if_match("n/rec", b"one", None) is True, "None: create"
        assert await b.put_if_match("n/rec", b"again", None) is False, "None: only if absent"
        first = await b.get_tagged("n/rec")
        assert first is not None and first.data == b"one"
        assert await b.put_if_match("n/rec", b"two", first.etag) is True
        second = await b.get_tagged("n/rec")
        assert second is not None and second.data == b"two" and second.etag != first.etag
        assert await b.put_if_match("n/rec", b"stale", first.etag) is False
        assert await b.get("n/rec") == b"two", "a stale tag never overwrites"
        with pytest.raises(ObjectTooLargeError):
            await b.get_tagged("n/rec", max_size=2)
        await b.delete("n/rec")
        assert await b.put_if_match("n/rec", b"three", second.etag) is False, "gone: no swap"
        assert [i.key async for i in b.list("n/")] == []

    asyncio.run(scenario())


def test_put_if_match_loses_no_update_under_contention(make_cloud: MakeCloud,
                                                       backend_kind: str) -> None:
    """8 writers each add 1 five times to one counter by read / compare-and-swap: every swap
    that reports True counts, so the counter ends at exactly 40 whatever the interleaving."""
    _, b = fresh(make_cloud, backend_kind)
    conflicts = 0

    async def add_one() -> None:
        nonlocal conflicts
        while True:
            cur = await retrying(lambda: b.get_tagged("counter"))
            new, tag = str(int(cur.data) + 1 if cur else 1).encode(), cur.etag if cur else None
            if await retrying(lambda: b.put_if_match("counter", new, tag)):  # noqa: B023
                return
            conflicts += 1

    async def writer() -> None:
        for _ in range(5):
            await add_one()

    async def scenario() -> None:
        await asyncio.gather(*(writer() for _ in range(8)))
        assert await b.get("counter") == b"40"

    asyncio.run(scenario())
    assert conflicts > 0, "the writers never raced: the test proved nothing"


# ---- errors mapped ----------------------------------------------------------------------------


def test_missing_object_is_not_found(make_cloud: MakeCloud, backend_kind: str) -> None:
    _, b = fresh(make_cloud, backend_kind)

    async def scenario() -> None:
        assert await b.size("no/such/key") is None
        with pytest.raises(ObjectNotFoundError) as info:
            await b.get("no/such/key")
        assert info.value.kind == "not_found" and "no/such/key" in str(info.value)
        await b.check()  # a store that exists, with accepted credentials

    asyncio.run(scenario())


@pytest.mark.parametrize("backend_kind", REMOTE)
def test_missing_container_is_permanent(make_cloud: MakeCloud, backend_kind: str) -> None:
    scheme = "azure" if backend_kind == "azurite" else "s3"
    _, b = fresh(make_cloud, backend_kind, url=f"{scheme}://no-such-container-here")

    async def scenario() -> None:
        for attempt in (b.check(), b.put_if_absent("k", b"v")):
            with pytest.raises(PermanentBackendError) as info:
                await attempt
            assert info.value.kind == "not_found"
            assert "'no-such-container-here' does not exist" in str(info.value)

    asyncio.run(scenario())


@pytest.mark.parametrize("backend_kind", REFUSING)
def test_bad_credentials_are_permanent_and_named(make_cloud: MakeCloud, backend_kind: str,
                                                 request: pytest.FixtureRequest,
                                                 tmp_path: Path) -> None:
    if backend_kind == "file":
        cloud, b = fresh(make_cloud, backend_kind)
        Path(cloud.url.removeprefix("file://")).chmod(0)
        problem = _refused(b)
    elif backend_kind == "azurite":
        wrong = tmp_path / "wrong.key"
        wrong.write_text("d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ==")
        wrong.chmod(0o600)
        cloud, b = fresh(make_cloud, backend_kind, account_key_file=str(wrong))
        start = time.monotonic()
        problem = _refused(b)
        assert time.monotonic() - start < 2, "an auth failure must not be retried inside obstore"
        message = str(problem)
        assert cloud.url in message and "put k" in message and "HTTP 403" in message
        assert str(wrong) in message, "the message names where the key came from"
    else:
        moto: Emulator = request.getfixturevalue("moto")
        _, b = fresh(make_cloud, backend_kind)
        with moto_checks_credentials(moto):
            problem = _refused(b)
    assert problem.kind == "auth" and "check the credentials" in str(problem)


def _refused(b: Backend) -> PermanentBackendError:
    with pytest.raises(PermanentBackendError) as info:
        asyncio.run(b.put_if_absent("k", b"v"))
    return info.value


# ---- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_kind", REMOTE)
def test_transient_failures_are_retried(make_cloud: MakeCloud, backend_kind: str) -> None:
    """The service answers 503, then drops connections: retried until the link is back."""
    cloud = make_cloud(backend_kind, proxy=True, prefix=PREFIX)
    proxy = cloud.proxy
    assert proxy is not None
    b = open_backend(load_backend_settings(cloud.write_config()))
    attempts: list[str] = []

    async def put() -> bool:
        try:
            return await b.put_if_absent("r/k", blob(5000))
        except TransientBackendError as e:
            attempts.append(e.kind)
            if len(attempts) == 1:
                proxy.cut_each_at = 100  # the next attempt loses its connection mid-request
            else:
                proxy.cut_each_at = None
            raise

    proxy.errors_for(0.2, status=503)
    assert asyncio.run(retrying(put, attempts=6, initial_s=0.5, max_s=1.0)) is True
    assert attempts[:2] == ["throttled", "connection"], attempts
    assert proxy.error_responses >= 1
    assert cloud.objects() == {f"{PREFIX}/r/k": 5000}


@pytest.mark.parametrize("backend_kind", REMOTE)
def test_put_plain_cut_mid_upload_is_retried_whole(make_cloud: MakeCloud, backend_kind: str,
                                                   tmp_path: Path) -> None:
    """Every connection cut 10 MiB into a 12 MiB multipart upload: the attempt fails transient,
    no lister sees a partial object, and the retry lands it whole with its metadata."""
    cloud = make_cloud(backend_kind, proxy=True, prefix=PREFIX)
    assert cloud.proxy is not None
    b = open_backend(load_backend_settings(cloud.write_config()))
    direct = cloud.backend()
    data = random.Random(10).randbytes(12 << 20)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    attempts: list[str] = []
    seen: set[int] = set()

    async def put() -> None:
        try:
            await b.put_plain("s/cut.bin", source, metadata={"sha256": "ef"})
        except TransientBackendError as e:
            attempts.append(e.kind)
            raise

    async def scenario() -> None:
        async def lister() -> None:
            while True:
                seen.update([i.size async for i in direct.list(PREFIX + "/s/")])
                await asyncio.sleep(0.005)

        polling = asyncio.create_task(lister())
        await retrying(put, attempts=4, initial_s=0.05, max_s=0.1)
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        assert await b.head("s/cut.bin") == (len(data), {"sha256": "ef"})
        assert await b.get("s/cut.bin") == data

    cloud.proxy.cut_at_totals([10 << 20])
    asyncio.run(scenario())
    assert attempts and set(attempts) <= {"connection", "timeout", "server_error"}, attempts
    assert seen <= {len(data)}, f"a lister saw a partial object: sizes {seen}"
    assert cloud.objects() == {f"{PREFIX}/s/cut.bin": len(data)}


def test_permanent_failures_are_not_retried(make_cloud: MakeCloud, backend_kind: str) -> None:
    _, b = fresh(make_cloud, backend_kind)
    calls = 0

    async def get() -> bytes:
        nonlocal calls
        calls += 1
        return await b.get("absent")

    with pytest.raises(ObjectNotFoundError):
        asyncio.run(retrying(get, attempts=6, initial_s=0.01, max_s=0.01))
    assert calls == 1


def test_list_folders_names_the_folders_below_a_prefix(make_cloud: MakeCloud,
                                                       backend_kind: str) -> None:
    """One delimiter listing: what `land` polls to find a site that starts sending."""
    _, b = fresh(make_cloud, backend_kind)

    async def scenario() -> None:
        assert await b.list_folders("") == ()
        await asyncio.gather(*(b.put_if_absent(k, blob(3)) for k in (
            "site-b/manifests/2026/12/05/x", "site-a/chunks/ab/abc", "site-a/manifests/1",
            "_skyferry/landed/x", "loose")))
        assert await b.list_folders("") == ("_skyferry", "site-a", "site-b")
        assert await b.list_folders("site-a/") == ("chunks", "manifests")
        assert await b.list_folders("site-b/manifests/2026/12/") == ("05",)
        assert await b.list_folders("nothing/") == ()

    asyncio.run(scenario())
