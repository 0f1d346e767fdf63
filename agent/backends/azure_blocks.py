"""Azure block blobs, resumable: Put Block / Get Block List / Put Block List through
azure-storage-blob's async client (obstore's multipart cannot resume: it starts over).

A chunk above BLOCK_SIZE is staged as blocks of BLOCK_SIZE, one request at a time (a cut
costs at most the block under way). Block ids are derived from the block's place and size,
and the blob's key is its content's keyed hash, so every attempt (after a cut, a retry, a
daemon restart) names the same blocks: it asks the service which ones it holds uncommitted
and stages only the others. Each block carries an MD5 the service checks, so a held block
of the right id and size holds our bytes. The blob appears only when its block list is
committed, create-only (If-None-Match: *); the uplink then reads it back as for any put.
Blocks never committed (a chunk evicted before it was sent again) are removed by the service
after a week.
"""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
from azure.core.exceptions import AzureError
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob import BlobBlock
from azure.storage.blob.aio import ContainerClient

from agent.backends.failures import Failures
from agent.backends.protocol import PutResult
from agent.backends.resumable import (
    Bounded,
    PerLoop,
    log_resumed,
    no_hidden_retry,
    sdk_failure,
)

BLOCK_SIZE = 1 << 20  # about 1 MiB: what a cut costs at most per upload under way
# Azure's service answers for a blob that exists already (If-None-Match: * failed).
_EXISTS = {"BlobAlreadyExists", "ConditionNotMet"}


def block_ids(size: int, block_size: int = BLOCK_SIZE) -> list[str]:
    """The ids of a blob's blocks: the same for every attempt, all of one length (Azure's
    rule), and naming the block size so blocks of another size are never mixed in."""
    count = max(1, -(-size // block_size))
    return [base64.b64encode(f"sf{block_size:08x}{i:06d}".encode()).decode()
            for i in range(count)]


class AzureBlocks:
    """`ResumableUploads` for one container (agent/backends/resumable.py)."""

    def __init__(self, account_url: str, container: str, credential: Any, failures: Failures,
                 connect_timeout_s: float, timeout_s: float, grace_s: float = 600.0,
                 block_size: int = BLOCK_SIZE) -> None:
        self.threshold = block_size
        self.part_size = block_size
        self._failures = failures

        async def make() -> ContainerClient:
            # aiohttp's read timeout runs from the request's start, body included, and a
            # block held through an outage may take up to its deadline (the backend's
            # `_bounded`, which also limits the small requests): no shorter. Like obstore's
            # upload client (objstore.client_options).
            # No retries inside the SDK (retry_total=0) nor inside aiohttp (no_hidden_retry):
            # the uplink's policy (agent/uplink/attempts.py) counts and paces every attempt,
            # as with obstore.
            session = no_hidden_retry(aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False))
            transport = AioHttpTransport(session=session, session_owner=True)
            return ContainerClient(account_url, container, credential=credential,
                                   transport=transport, retry_total=0,
                                   connection_timeout=connect_timeout_s,
                                   read_timeout=grace_s, user_agent="skyferry")

        async def close(client: ContainerClient) -> None:
            await client.close()

        self._clients: PerLoop[ContainerClient] = PerLoop(make, close, grace_s)

    def renew(self) -> None:
        self._clients.renew()

    async def _call(self, op: str, key: str, coro: Any, nbytes: int, bounded: Bounded) -> Any:
        try:
            return await bounded(coro, nbytes)
        except (AzureError, OSError, TimeoutError) as e:
            raise self._map(op, key, e) from e

    def _map(self, op: str, key: str, e: BaseException) -> Any:
        return sdk_failure(self._failures, op, key, e, getattr(e, "status_code", None),
                           getattr(e, "error_code", None))

    async def put_new(self, full: str, key: str, data: bytes,
                      bounded: Bounded) -> PutResult | None:
        blob = (await self._clients.get()).get_blob_client(full)
        ids = block_ids(len(data), self.part_size)
        held = await self._held(blob, key, bounded)
        sent = 0
        for i, block_id in enumerate(ids):
            part = data[i * self.part_size:(i + 1) * self.part_size]
            if held.get(block_id) == len(part):
                continue
            await self._call("put", key, blob.stage_block(
                block_id, part, length=len(part), validate_content=True), len(part), bounded)
            sent += 1
        log_resumed("azure", key, len(ids) - sent, sent, len(ids))
        try:
            result = await bounded(blob.commit_block_list(
                [BlobBlock(block_id=b) for b in ids], if_none_match="*"), 0)
        except AzureError as e:
            if getattr(e, "status_code", None) in (409, 412) and (
                    getattr(e, "error_code", None) in _EXISTS):
                return None
            raise self._map("put", key, e) from e
        except (OSError, TimeoutError) as e:
            raise self._map("put", key, e) from e
        etag = result.get("etag")
        return PutResult(True, str(etag) if etag is not None else None)

    async def _held(self, blob: Any, key: str, bounded: Bounded) -> dict[str, int]:
        """id -> size of the blocks the service holds uncommitted for this blob."""
        try:
            _, uncommitted = await bounded(blob.get_block_list("uncommitted"), 0)
        except AzureError as e:
            if getattr(e, "status_code", None) == 404 and (
                    getattr(e, "error_code", None) == "BlobNotFound"):
                return {}  # nothing staged yet (a missing container is another 404)
            raise self._map("put", key, e) from e
        except (OSError, TimeoutError) as e:
            raise self._map("put", key, e) from e
        return {b.id: int(b.size) for b in uncommitted}
