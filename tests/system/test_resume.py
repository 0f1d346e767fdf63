"""Resumable chunk uploads: after a cut, only what the service lacks crosses the link.

A chunk larger than a block (Azure, ~1 MiB blocks) or than the multipart threshold (S3, 5 MiB
parts) goes in parts; the fault proxy cuts every connection part-way through, and the retry,
made by a fresh backend object (as after a daemon restart: nothing is remembered on the edge),
sends only the missing blocks or parts. The proxy counts the bytes that crossed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from agent.backends.azure_blocks import BLOCK_SIZE
from agent.backends.config import load_backend_settings
from agent.backends.protocol import Backend
from agent.backends.registry import open_backend
from agent.backends.s3_multipart import PART_SIZE, THRESHOLD
from agent.errors import ObjectConflictError, TransientBackendError
from tests.kits.emulators import Cloud

MiB = 1 << 20
HEADERS = 64 << 10  # requests' heads and the small calls (list, commit), generously

MakeCloud = Callable[..., Cloud]


def _backend(cloud: Cloud) -> Backend:
    return open_backend(load_backend_settings(cloud.write_config()))


@pytest.mark.parametrize("kind,size,cut_at,kept", [
    # 4.5 MiB in 1 MiB blocks, cut 2.5 MiB in: blocks 0 and 1 are held.
    ("azurite", 4 * MiB + MiB // 2, 2 * MiB + MiB // 2, 2 * BLOCK_SIZE),
    # 12 MiB in 5 MiB parts, cut 7 MiB in: part 1 is held.
    ("moto", 12 * MiB, 7 * MiB, PART_SIZE),
])
def test_a_cut_chunk_resumes_with_only_the_missing_parts(make_cloud: MakeCloud, kind: str,
                                                         size: int, cut_at: int,
                                                         kept: int) -> None:
    assert kind != "moto" or size > THRESHOLD
    cloud = make_cloud(kind, proxy=True, prefix="site")
    proxy = cloud.proxy
    assert proxy is not None
    data = random.Random(size).randbytes(size)
    key = "c/ab/resumed"

    proxy.cut_at_totals([cut_at])
    with pytest.raises(TransientBackendError) as info:
        asyncio.run(_backend(cloud).put_new(key, data))
    assert info.value.kind in ("connection", "timeout"), info.value
    assert cloud.objects() == {}, "nothing is visible before the parts are committed"
    first = proxy.bytes_up
    assert cut_at - HEADERS <= first <= cut_at

    proxy.reset_counters()

    async def retry() -> None:
        b = _backend(cloud)  # a new process would know no more than this one
        result = await b.put_new(key, data)
        assert result.written
        await b.verify_written(key, size, result.etag)
        assert await b.get(key) == data

    asyncio.run(retry())
    again = proxy.bytes_up
    missing = size - kept
    assert missing <= again <= missing + HEADERS, (
        f"the retry sent {again:,} bytes; only {missing:,} were missing")
    assert cloud.objects() == {f"site/{key}": size}


@pytest.mark.parametrize("kind,size", [("azurite", 3 * MiB), ("moto", THRESHOLD + MiB)])
def test_parted_uploads_are_create_only(make_cloud: MakeCloud, kind: str, size: int) -> None:
    cloud = make_cloud(kind, proxy=True)
    b = _backend(cloud)
    data = random.Random(1).randbytes(size)

    async def scenario() -> None:
        assert (await b.put_new("k", data)).written
        proxy = cloud.proxy
        assert proxy is not None
        proxy.reset_counters()
        # Same key and size: an earlier attempt's, nothing overwritten.
        assert (await b.put_new("k", random.Random(2).randbytes(size))).written is False
        assert await b.get("k") == data
        with pytest.raises(ObjectConflictError):
            await b.put_new("k", data[:-1])
        assert await b.get("k") == data

    asyncio.run(scenario())
    if kind == "moto":  # the refused completion aborted its upload: no parts left behind
        s3 = _s3_uploads(cloud)
        assert s3 == [], s3


def _s3_uploads(cloud: Cloud) -> list[str]:
    import boto3

    direct = cloud.direct
    client = boto3.client("s3", endpoint_url=direct["endpoint"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    bucket = cloud.url.removeprefix("s3://").split("/")[0]
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def test_renew_leaves_an_upload_under_way_alone(make_cloud: MakeCloud) -> None:
    """The uplink renews the backend's connections when the gate reopens; an upload held
    through the outage goes on over its own connection."""
    cloud = make_cloud("azurite", proxy=True)
    proxy = cloud.proxy
    assert proxy is not None
    proxy.rate_bps = 4 * MiB  # ~0.75 s for the 3 MiB
    b = _backend(cloud)
    data = random.Random(3).randbytes(3 * MiB)

    async def scenario() -> None:
        upload = asyncio.create_task(b.put_new("held", data))
        while proxy.bytes_up < MiB // 2:
            await asyncio.sleep(0.01)
        b.renew()
        result = await upload
        assert result.written
        await b.verify_written("held", len(data), result.etag)
        assert (await b.put_new("after", data[:MiB + 1])).written  # a new client serves

    asyncio.run(scenario())
    assert cloud.objects() == {"held": 3 * MiB, "after": MiB + 1}
