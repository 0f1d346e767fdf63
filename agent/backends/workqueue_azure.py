"""azqueue://<account>/<queue>: a work queue on Azure Storage Queue (azure-storage-queue's aio
client). The visibility timeout is the lease, `update_message` extends it (and changes the pop
receipt), `dequeue_count` is the receive count; the dead-letter queue is a second queue of the
same account.

Bodies are sent base64-encoded (the SDK's TextBase64EncodePolicy), as Event Grid and the other
SDKs write them. They are decoded here rather than by TextBase64DecodePolicy, which raises on a
message that is not base64: one such message from another producer would fail every receive.
Azure Storage Queue has no long polling: `receive` polls until `wait_s` has passed.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.queue import TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from agent.backends.azure import AZURITE_ACCOUNT, AZURITE_KEY, parse_connection_string
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

MAX_PER_RECEIVE = 32  # the service's limit per Get Messages call
# Messages expire after 7 days by default: a lander stopped for a week would lose its work.
NEVER = -1
# What a stale pop receipt gets: the message was deleted, or received again since.
LOST = ("MessageNotFound", "PopReceiptMismatch")


def open_queue(url: str, where: QueueAddress, options: QueueOptions,
               environ: Mapping[str, str]) -> AzureWorkQueue:
    account_url, credential, creds = _credential(url, where, options, environ)
    dead = dead_letter_address(where, options)
    if isinstance(dead, str):
        raise PermanentBackendError(f"work queue {url}: dead_letter {dead}", "config")
    kw: dict[str, Any] = {
        "credential": credential,
        "message_encode_policy": TextBase64EncodePolicy(),
        "connection_timeout": options.connect_timeout_s,
        "read_timeout": options.timeout_s,
        # The SDK's default backs off 15 s, then 18 s...: far beyond a lease.
        "retry_total": options.retries, "initial_backoff": 1, "increment_base": 2,
        "random_jitter_range": 1,
    }
    work = QueueClient(account_url, where.queue, **kw)
    dlq = QueueClient(account_url, dead.queue, **kw)
    return AzureWorkQueue(url, work, dlq, _Failures(url, creds, account_url))


def _credential(url: str, where: QueueAddress, options: QueueOptions,
                env: Mapping[str, str]) -> tuple[str, Any, str]:
    """(account URL, SDK credential, where the credential came from)."""
    account_url = where.endpoint or f"https://{where.account}.queue.core.windows.net"
    if options.account_key is not None:
        key = read_secret(options.account_key, env, f"work queue {url} account key")
        return (account_url, AzureNamedKeyCredential(where.account, key),
                f"account key from {options.account_key.describe()}")
    if options.sas_token is not None:
        sas = read_secret(options.sas_token, env, f"work queue {url} SAS token").lstrip("?")
        creds = f"SAS token from {options.sas_token.describe()}"
        return account_url, AzureSasCredential(sas), creds
    if options.connection_string is None:
        raise PermanentBackendError(
            f"work queue {url}: no credential; set account_key_file (or _env), sas_token_file "
            "or connection_string_file", "config")
    creds = f"connection string from {options.connection_string.describe()}"
    try:
        parts = parse_connection_string(
            read_secret(options.connection_string, env, f"work queue {url} connection string"))
    except ValueError as e:
        raise PermanentBackendError(f"work queue {url}: {creds}: {e}", "config") from None
    if parts.get("UseDevelopmentStorage", "").lower() == "true":
        parts = {"AccountName": AZURITE_ACCOUNT, "AccountKey": AZURITE_KEY,
                 "QueueEndpoint": f"http://127.0.0.1:10001/{AZURITE_ACCOUNT}"}
    if options.endpoint is None and "QueueEndpoint" in parts:
        account_url = parts["QueueEndpoint"].rstrip("/")
    if "AccountKey" in parts:
        name = parts.get("AccountName", where.account)
        return account_url, AzureNamedKeyCredential(name, parts["AccountKey"]), creds
    if "SharedAccessSignature" in parts:
        return account_url, AzureSasCredential(parts["SharedAccessSignature"].lstrip("?")), creds
    raise PermanentBackendError(
        f"work queue {url}: {creds} holds neither AccountKey nor SharedAccessSignature; copy "
        "it from the portal (Storage account > Access keys)", "config")


def decode_body(content: object) -> str:
    """A message's text: base64 of UTF-8 as sent here, else the content as it is."""
    text = content if isinstance(content, str) else ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return text


class AzureWorkQueue:
    def __init__(self, url: str, work: QueueClient, dlq: QueueClient,
                 failures: _Failures) -> None:
        self.url = url
        self._work = work
        self._dlq = dlq
        self._fail = failures

    async def send(self, body: str) -> None:
        check_body(self.url, body)
        try:
            await self._work.send_message(body, time_to_live=NEVER)
        except AzureError as e:
            raise self._fail.map("send", e) from None

    async def receive(self, max_messages: int, lease_s: float,
                      wait_s: float = 1.0) -> list[QueueMessage]:
        lease = lease_seconds(self.url, lease_s)
        count = max(1, min(max_messages, MAX_PER_RECEIVE))

        async def attempt(_wait: float) -> list[QueueMessage]:
            try:
                pages = self._work.receive_messages(
                    messages_per_page=count, max_messages=count, visibility_timeout=lease)
                return [QueueMessage(m.id, decode_body(m.content), m.pop_receipt or "",
                                     m.dequeue_count or 1) async for m in pages]
            except AzureError as e:
                raise self._fail.map("receive", e) from None

        return await poll(wait_s, attempt)

    async def extend(self, msg: QueueMessage, lease_s: float) -> QueueMessage:
        lease = lease_seconds(self.url, lease_s)
        try:
            got = await self._work.update_message(msg.id, msg.receipt, visibility_timeout=lease)
        except AzureError as e:
            if _error_code(e) in LOST:
                raise LeaseLostError(
                    f"work queue {self.url}: the lease on message {msg.id} ran out before it "
                    "was extended (another worker may hold it now); extend sooner, or give "
                    "a longer lease", "lease_lost") from None
            raise self._fail.map("extend", e) from None
        return QueueMessage(msg.id, msg.body, got.pop_receipt or msg.receipt, msg.receive_count)

    async def delete(self, msg: QueueMessage) -> None:
        try:
            await self._work.delete_message(msg.id, msg.receipt)
        except AzureError as e:
            if _error_code(e) not in LOST:
                raise self._fail.map("delete", e) from None

    async def dead_letter(self, msg: QueueMessage, reason: str) -> None:
        record = json.dumps({"body": msg.body, "reason": reason,
                             "receive_count": msg.receive_count, "id": msg.id})
        try:
            await self._dlq.send_message(record, time_to_live=NEVER)
        except AzureError as e:
            raise self._fail.map("dead-letter", e, self._dlq.queue_name) from None
        await self.delete(msg)

    async def aclose(self) -> None:
        await self._work.close()
        await self._dlq.close()


def _error_code(e: AzureError) -> str:
    code = getattr(e, "error_code", None)
    return str(getattr(code, "value", code) or "")


class _Failures:
    """Maps the SDK's errors to one line naming the queue, what failed and what to do."""

    def __init__(self, url: str, credentials: str, account_url: str) -> None:
        self.url = url
        self.credentials = credentials
        self.account_url = account_url

    def map(self, op: str, e: AzureError, queue: str | None = None) -> BackendError:
        where = f"work queue {self.url}" + (f" (dead-letter queue {queue})" if queue else "")
        status = getattr(e, "status_code", None)
        code = _error_code(e)
        found = f"HTTP {status} {code}".strip() if status else _first_line(e)
        if isinstance(e, ClientAuthenticationError) or status in (401, 403):
            return PermanentBackendError(
                f"{where}: {op} was refused ({found}): check the credentials ({self.credentials})"
                " and their permissions on the queue", "auth")
        if isinstance(e, ResourceNotFoundError) or status == 404:
            return PermanentBackendError(
                f"{where}: {op} failed: the queue does not exist at {self.account_url} "
                f"({found}); create it (az storage queue create -n NAME), or fix url", "not_found")
        if isinstance(e, ServiceRequestError):
            return TransientBackendError(
                f"{where}: {op} failed: cannot reach {self.account_url} ({found}); check "
                "endpoint and the network", "connection")
        if isinstance(e, ServiceResponseError):
            return TransientBackendError(
                f"{where}: {op} failed: no answer from {self.account_url} in time ({found})",
                "timeout")
        if isinstance(e, HttpResponseError) and status is not None and (
                status >= 500 or status in (408, 429)):
            return TransientBackendError(f"{where}: {op} failed: the service answered {found}",
                                         "server_error")
        return PermanentBackendError(
            f"{where}: {op} was rejected ({found}); check the [queue] settings", "rejected")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else type(e).__name__
    return first if len(first) <= 200 else first[:197] + "..."
