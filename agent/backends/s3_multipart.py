"""S3 multipart uploads, resumable, through aiobotocore (obstore's multipart cannot resume).

A chunk above THRESHOLD goes as a multipart upload of PART_SIZE parts (S3's smallest part is
5 MiB), one part at a time, so a cut costs at most the part under way. Every attempt first
looks for an unfinished upload of the same key (ListMultipartUploads) and the parts it holds
(ListParts): after a cut, a retry or a daemon restart only the missing parts are sent; the
upload id lives at the service, nothing is kept on the edge. The key is the content's keyed
hash, and each part carries a checksum the service checks, so a held part of the right number
and size holds our bytes. Completion is create-only (If-None-Match: *): when the object exists
already the upload is aborted and the caller checks the existing one. Extra unfinished uploads
of the same key (two attempts that each began one) are aborted too. An upload whose chunk is
never sent again (its object evicted or expired meanwhile) stays until a bucket lifecycle rule
(AbortIncompleteMultipartUpload, a few days) removes it: README's S3 setup names the rule.

THRESHOLD: below it one PUT is cheaper than the three extra round trips a multipart upload
costs (create, complete, the look for an earlier one); measured on moto behind a 40 ms proxy,
see the `s3_parts` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from agent.backends.failures import Failures
from agent.backends.protocol import PutResult
from agent.backends.resumable import (
    Bounded,
    PerLoop,
    log_resumed,
    no_hidden_retry,
    sdk_failure,
)

MiB = 1 << 20
PART_SIZE = 5 * MiB  # S3's smallest part (all but the last)
THRESHOLD = 8 * MiB  # larger chunks go in parts (see the module's docstring)


class _Session(AIOHTTPSession):  # type: ignore[misc]
    """aiobotocore's HTTP session, without aiohttp's own re-send (`no_hidden_retry`)."""

    async def _get_session(self, proxy_url: Any) -> Any:
        return no_hidden_retry(await super()._get_session(proxy_url))


class S3Parts:
    """`ResumableUploads` for one bucket (agent/backends/resumable.py)."""

    def __init__(self, bucket: str, client_kw: Mapping[str, Any], profile: str | None,
                 failures: Failures, connect_timeout_s: float, timeout_s: float,
                 grace_s: float = 600.0, threshold: int = THRESHOLD,
                 part_size: int = PART_SIZE) -> None:
        self.bucket = bucket
        self.threshold = threshold
        self.part_size = part_size
        self._failures = failures
        # The read timeout covers a part's whole upload (aiohttp starts it with the request):
        # a part held through an outage may take up to its deadline (`grace_s`, the backend's
        # `_bounded`, which also limits the small requests).
        config = AioConfig(connect_timeout=connect_timeout_s, read_timeout=grace_s,
                           retries={"total_max_attempts": 1}, user_agent_extra="skyferry",
                           http_session_cls=_Session,
                           s3={"addressing_style": "path"} if "endpoint_url" in client_kw
                           else None)

        async def make() -> Any:
            # No retries inside botocore: the uplink's policy counts and paces every attempt.
            session = AioSession(profile=profile)
            return await session.create_client("s3", config=config, **client_kw).__aenter__()

        async def close(client: Any) -> None:
            await client.close()

        self._clients: PerLoop[Any] = PerLoop(make, close, grace_s)

    def renew(self) -> None:
        self._clients.renew()

    def _map(self, op: str, key: str, e: BaseException) -> Any:
        status = code = None
        if isinstance(e, ClientError):
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code")
        return sdk_failure(self._failures, op, key, e, status, code)

    async def _call(self, op: str, key: str, coro: Any, nbytes: int, bounded: Bounded) -> Any:
        try:
            return await bounded(coro, nbytes)
        except (ClientError, BotoCoreError, OSError, TimeoutError) as e:
            raise self._map(op, key, e) from e

    async def put_new(self, full: str, key: str, data: bytes,
                      bounded: Bounded) -> PutResult | None:
        s3 = await self._clients.get()
        upload_id, held = await self._earlier(s3, full, key, bounded)
        if upload_id is None:
            made = await self._call("put", key, s3.create_multipart_upload(
                Bucket=self.bucket, Key=full), 0, bounded)
            upload_id = str(made["UploadId"])
        parts, sent = [], 0
        count = max(1, -(-len(data) // self.part_size))
        for n in range(1, count + 1):
            body = data[(n - 1) * self.part_size:n * self.part_size]
            etag = held.get(n, (0, ""))[1] if held.get(n, (0, ""))[0] == len(body) else None
            if etag is None:
                answer = await self._call("put", key, s3.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=n, Body=body),
                    len(body), bounded)
                etag, sent = str(answer["ETag"]), sent + 1
            parts.append({"PartNumber": n, "ETag": etag})
        log_resumed("s3", key, count - sent, sent, count)
        try:
            done = await bounded(s3.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id,
                MultipartUpload={"Parts": parts}, IfNoneMatch="*"), 0)
        except ClientError as e:
            if self._map("put", key, e).kind != "rejected" or (
                    e.response.get("Error", {}).get("Code") != "PreconditionFailed"):
                raise self._map("put", key, e) from e
            await self._abort(s3, full, upload_id, bounded)
            return None  # the object is there already
        except (BotoCoreError, OSError, TimeoutError) as e:
            raise self._map("put", key, e) from e
        etag = done.get("ETag")
        return PutResult(True, str(etag) if etag is not None else None)

    async def _earlier(self, s3: Any, full: str, key: str,
                       bounded: Bounded) -> tuple[str | None, dict[int, tuple[int, str]]]:
        """An unfinished upload of this key and its parts (number -> (size, ETag)); extra
        ones are aborted. (None, {}) when there is none."""
        listing = await self._call("put", key, s3.list_multipart_uploads(
            Bucket=self.bucket, Prefix=full), 0, bounded)
        uploads = sorted((u for u in listing.get("Uploads", []) if u.get("Key") == full),
                         key=lambda u: str(u.get("Initiated", "")))
        if not uploads:
            return None, {}
        keep = str(uploads[0]["UploadId"])
        for extra in uploads[1:]:
            await self._abort(s3, full, str(extra["UploadId"]), bounded)
        held: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            page = await self._call("put", key, s3.list_parts(
                Bucket=self.bucket, Key=full, UploadId=keep, PartNumberMarker=marker), 0,
                bounded)
            for p in page.get("Parts", []):
                held[int(p["PartNumber"])] = (int(p["Size"]), str(p["ETag"]))
            if not page.get("IsTruncated"):
                return keep, held
            marker = int(page["NextPartNumberMarker"])

    async def _abort(self, s3: Any, full: str, upload_id: str, bounded: Bounded) -> None:
        try:
            await bounded(s3.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                    UploadId=upload_id), 0)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise self._map("put", full, e) from e
        except (BotoCoreError, OSError, TimeoutError) as e:
            raise self._map("put", full, e) from e
