"""sqs://<region>/<account-id>/<queue> (or the queue's https URL): a work queue on Amazon SQS
(aiobotocore). ReceiveMessage's VisibilityTimeout is the lease, ChangeMessageVisibility extends
it (the receipt handle stays), the ApproximateReceiveCount attribute is the receive count.

The dead-letter queue is a second queue this adapter sends to with the reason: SQS's own redrive
policy moves a message after maxReceiveCount receives but cannot say why. (Configure no redrive
policy on the work queue, or one with a maxReceiveCount above the lander's own limit; and the
longest retention, 14 days: SQS drops older messages, unlike the Azure adapter's, which never
expire.)

botocore and aiobotocore ship without type information: their calls return plain dicts, typed
`Any` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from agent.backends.secrets import read_secret
from agent.backends.workqueue import (
    LeaseLostError,
    QueueMessage,
    check_body,
    lease_seconds,
    poll,
)
from agent.backends.workqueue_config import QueueAddress, QueueOptions, dead_letter_address
from agent.errors import BackendError, PermanentBackendError, TransientBackendError

MAX_PER_RECEIVE = 10  # the service's limit per ReceiveMessage
MAX_WAIT_S = 20  # the longest long poll
MAX_LEASE_S = 12 * 3600.0
# What a receipt handle whose lease ran out gets (the message was received again, or deleted).
LOST = ("ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight",
        "AWS.SimpleQueueService.MessageNotInflight")
NOT_FOUND = ("QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue")
AUTH = ("InvalidClientTokenId", "SignatureDoesNotMatch", "AccessDenied", "AccessDeniedException",
        "UnrecognizedClientException", "InvalidAccessKeyId", "ExpiredToken",
        "MissingAuthenticationToken")
THROTTLED = ("RequestThrottled", "ThrottlingException", "KmsThrottled", "ServiceUnavailable")


def open_queue(url: str, where: QueueAddress, options: QueueOptions,
               environ: Mapping[str, str]) -> SqsWorkQueue:
    dead = dead_letter_address(where, options)
    if isinstance(dead, str):
        raise PermanentBackendError(f"work queue {url}: dead_letter {dead}", "config")
    kw, creds = _credentials(url, options, environ)
    config = AioConfig(
        connect_timeout=options.connect_timeout_s,
        # A long poll holds the answer back for up to MAX_WAIT_S.
        read_timeout=options.timeout_s + MAX_WAIT_S,
        retries={"max_attempts": options.retries + 1, "mode": "standard"})
    profile = options.profile

    def create() -> Any:
        session = AioSession(profile=profile) if profile else AioSession()
        return session.create_client("sqs", region_name=where.region,
                                     endpoint_url=where.endpoint, config=config, **kw)

    place = where.endpoint or f"SQS in {where.region}"
    return SqsWorkQueue(url, where.queue_url, dead.queue_url, create,
                        _Failures(url, creds, place))


def _credentials(url: str, o: QueueOptions, env: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The client's key-pair arguments (none: a profile or the default chain), and a description."""
    if o.secret_access_key is None:
        if o.profile:
            return {}, f"AWS profile {o.profile!r}"
        return {}, "the AWS default credential chain (AWS_* environment, instance metadata...)"
    key_id = o.access_key_id or ""
    if o.access_key_id_env is not None:
        key_id = env.get(o.access_key_id_env, "")
        if not key_id:
            raise PermanentBackendError(
                f"work queue {url}: environment variable {o.access_key_id_env} (access key id) "
                "is not set; set it in the service's environment (systemd: EnvironmentFile=)",
                "config")
    kw = {"aws_access_key_id": key_id,
          "aws_secret_access_key": read_secret(o.secret_access_key, env,
                                               f"work queue {url} secret access key")}
    creds = f"access key {key_id[:4]}… with secret from {o.secret_access_key.describe()}"
    if o.session_token is not None:
        kw["aws_session_token"] = read_secret(o.session_token, env,
                                              f"work queue {url} session token")
        creds += f" and session token from {o.session_token.describe()}"
    return kw, creds


class SqsWorkQueue:
    def __init__(self, url: str, queue_url: str, dead_url: str, create: Callable[[], Any],
                 failures: _Failures) -> None:
        self.url = url
        self._queue_url = queue_url
        self._dead_url = dead_url
        self._create = create  # aiobotocore's client context, made and entered at the first call
        self._context: Any = None
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._fail = failures

    async def _sqs(self) -> Any:
        async with self._lock:
            if self._client is None:
                self._context = self._create()
                self._client = await self._context.__aenter__()
            return self._client

    async def _call(self, op: str, method: str, **kw: Any) -> Any:
        client = await self._sqs()
        try:
            return await getattr(client, method)(**kw)
        except (BotoCoreError, ClientError) as e:
            raise self._fail.map(op, e, kw.get("QueueUrl", self._queue_url)) from None

    async def send(self, body: str) -> None:
        check_body(self.url, body)
        await self._call("send", "send_message", QueueUrl=self._queue_url, MessageBody=body)

    async def receive(self, max_messages: int, lease_s: float,
                      wait_s: float = 1.0) -> list[QueueMessage]:
        lease = lease_seconds(self.url, lease_s, MAX_LEASE_S)
        count = max(1, min(max_messages, MAX_PER_RECEIVE))

        async def attempt(wait: float) -> list[QueueMessage]:
            got = await self._call(
                "receive", "receive_message", QueueUrl=self._queue_url,
                MaxNumberOfMessages=count, VisibilityTimeout=lease,
                WaitTimeSeconds=min(MAX_WAIT_S, math.floor(wait)),
                MessageSystemAttributeNames=["ApproximateReceiveCount"])
            return [QueueMessage(str(m["MessageId"]), str(m["Body"]), str(m["ReceiptHandle"]),
                                 int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)))
                    for m in got.get("Messages", [])]

        return await poll(wait_s, attempt)

    async def extend(self, msg: QueueMessage, lease_s: float) -> QueueMessage:
        lease = lease_seconds(self.url, lease_s, MAX_LEASE_S)
        try:
            await self._call("extend", "change_message_visibility", QueueUrl=self._queue_url,
                             ReceiptHandle=msg.receipt, VisibilityTimeout=lease)
        except PermanentBackendError as e:
            if e.kind != "lease_lost":
                raise
            raise LeaseLostError(
                f"work queue {self.url}: the lease on message {msg.id} ran out before it was "
                "extended (another worker may hold it now); extend sooner, or give a longer "
                "lease", "lease_lost") from None
        return msg

    async def delete(self, msg: QueueMessage) -> None:
        try:
            await self._call("delete", "delete_message", QueueUrl=self._queue_url,
                             ReceiptHandle=msg.receipt)
        except PermanentBackendError as e:
            if e.kind != "lease_lost":
                raise

    async def dead_letter(self, msg: QueueMessage, reason: str) -> None:
        record = json.dumps({"body": msg.body, "reason": reason,
                             "receive_count": msg.receive_count, "id": msg.id})
        await self._call("dead-letter", "send_message", QueueUrl=self._dead_url,
                         MessageBody=record)
        await self.delete(msg)

    async def aclose(self) -> None:
        async with self._lock:
            if self._client is not None:
                self._client = None
                await self._context.__aexit__(None, None, None)


class _Failures:
    """Maps botocore's errors to one line naming the queue, what failed and what to do."""

    def __init__(self, url: str, credentials: str, place: str) -> None:
        self.url = url
        self.credentials = credentials
        self.place = place

    def map(self, op: str, e: Exception, queue_url: str) -> BackendError:
        where = f"work queue {self.url}"
        if op == "dead-letter":
            where += f" (dead-letter queue {queue_url})"
        if isinstance(e, NoCredentialsError):
            return PermanentBackendError(
                f"{where}: {op} failed: no AWS credentials found ({self.credentials}); set "
                "access_key_id and secret_access_key_file, or profile", "auth")
        if isinstance(e, ConnectTimeoutError | ReadTimeoutError):
            return TransientBackendError(
                f"{where}: {op} failed: no answer from {self.place} in time", "timeout")
        if isinstance(e, EndpointConnectionError):
            return TransientBackendError(
                f"{where}: {op} failed: cannot reach {self.place}; check endpoint and the "
                "network", "connection")
        if not isinstance(e, ClientError):
            return TransientBackendError(f"{where}: {op} failed: {_one_line(str(e))}",
                                         "connection")
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        found = f"HTTP {status} {code}: {_one_line(str(error.get('Message', '')))}"
        return self._client_error(where, op, code, status, found)

    def _client_error(self, where: str, op: str, code: str, status: int,
                      found: str) -> BackendError:
        if code in LOST and op in ("extend", "delete"):
            return PermanentBackendError(f"{where}: {op}: the lease was lost ({found})",
                                         "lease_lost")
        if code in NOT_FOUND:
            return PermanentBackendError(
                f"{where}: {op} failed: the queue does not exist at {self.place} ({found}); "
                "create it (aws sqs create-queue --queue-name NAME), or fix url", "not_found")
        if code in AUTH or status in (401, 403):
            return PermanentBackendError(
                f"{where}: {op} was refused ({found}): check the credentials ({self.credentials})"
                " and their permissions on the queue", "auth")
        if code in THROTTLED or status >= 500 or status in (408, 429):
            return TransientBackendError(f"{where}: {op} failed: the service answered {found}",
                                         "server_error")
        return PermanentBackendError(
            f"{where}: {op} was rejected ({found}); check the [queue] settings", "rejected")


def _one_line(text: str) -> str:
    first = (text.strip().splitlines() or [""])[0]
    return first if len(first) <= 200 else first[:197] + "..."
