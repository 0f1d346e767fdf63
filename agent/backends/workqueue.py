"""The work queue the lander's workers share: the `WorkQueue` protocol and its opener.

A work item is a short text (JSON) in the cloud's own queue service: Azure Storage Queue
(`azqueue://`, workqueue_azure.py) or SQS (`sqs://` or the queue's https URL, workqueue_sqs.py).
The visibility timeout is the lease: a received message is hidden from other receivers for
`lease_s`, `extend` keeps it hidden, `delete` ends it; a message whose lease ran out comes back
with its `receive_count` one higher. Failed items go to a second queue, the dead-letter queue,
with their reason (a service's own redrive cannot carry one).

Every failure is an agent.errors `BackendError` naming the queue, what failed and what to do;
`LeaseLostError` when a lease cannot be extended because it ran out (another worker may hold the
message now). tests/system/test_work_queues.py holds both adapters to this contract, against
Azurite and moto.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from agent.backends.workqueue_config import (
    QueueAddress,
    QueueOptions,
    QueueSettings,
    address,
    load_queue_settings,
    read_queue,
)
from agent.errors import BackendError, PermanentBackendError

__all__ = [
    "MAX_BODY_BYTES",
    "LeaseLostError",
    "QueueMessage",
    "QueueOptions",
    "QueueSettings",
    "WorkQueue",
    "load_queue_settings",
    "open_work_queue",
    "read_queue",
]

# Azure takes 64 KiB per message, base64-encoded: 48 KiB of text. The same limit on SQS keeps the
# services interchangeable; larger work belongs in an object the message names.
MAX_BODY_BYTES = 48 * 1024
# The characters SQS accepts in a body (XML 1.0's); Azure's base64 would take any, but a body
# must mean the same on both services.
_INVALID_CHAR_RE = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
MAX_LEASE_S = 7 * 86400.0  # Azure's longest visibility timeout (SQS: 12 h, checked there)

ADAPTERS = {"azqueue": "agent.backends.workqueue_azure", "sqs": "agent.backends.workqueue_sqs"}


@dataclass(frozen=True)
class QueueMessage:
    id: str
    body: str  # text as sent (adapters handle any base64 the service needs)
    receipt: str  # handle for extend/delete (Azure: pop receipt, changes on extend)
    receive_count: int  # how many times it has been received (dequeue count), 1 the first time


class WorkQueue(Protocol):
    url: str

    async def send(self, body: str) -> None:
        """Queue a work item (text, at most MAX_BODY_BYTES of UTF-8)."""

    async def receive(self, max_messages: int, lease_s: float,
                      wait_s: float = 1.0) -> list[QueueMessage]:
        """Up to `max_messages`, each hidden from other receivers for `lease_s`; [] if none
        arrived within `wait_s`."""

    async def extend(self, msg: QueueMessage, lease_s: float) -> QueueMessage:
        """Hide `msg` for `lease_s` from now; the returned message holds the new receipt.
        LeaseLostError when the lease had run out and another receiver took the message (Azure;
        SQS may accept a stale receipt: landing is idempotent, so that costs nothing)."""

    async def delete(self, msg: QueueMessage) -> None:
        """Done with `msg`. Gone already, or its lease lost to another receiver: no error."""

    async def dead_letter(self, msg: QueueMessage, reason: str) -> None:
        """Send {"body", "reason", "receive_count", "id"} as JSON to the dead-letter queue,
        then delete `msg`."""

    async def aclose(self) -> None:
        """Close the connections (the queue itself stays)."""


class LeaseLostError(BackendError):
    """The lease on a message ran out and it was received again (maybe by another worker)."""


def open_work_queue(url: str, options: QueueOptions,
                    environ: Mapping[str, str] | None = None) -> WorkQueue:
    """The queue `url` names; secrets are read now, from `environ` (default: this process's).

    Nothing is sent until the first call; a missing queue or refused credentials show then.
    """
    found = address(url, options)
    if isinstance(found, str):
        raise PermanentBackendError(f"work queue {url}: {found}", "config")
    if not options.dead_letter:
        raise PermanentBackendError(
            f"work queue {url}: no dead-letter queue; set dead_letter = \"<queue>-dead\" (a "
            "second queue, for items that keep failing)", "config")
    module = importlib.import_module(ADAPTERS[found.service])
    opener: Callable[[str, QueueAddress, QueueOptions, Mapping[str, str]], WorkQueue] = (
        module.open_queue)
    return opener(url, found, options, os.environ if environ is None else environ)


def check_body(url: str, body: str) -> bytes:
    """The body's UTF-8, or a PermanentBackendError saying why the services would refuse it."""
    bad = _INVALID_CHAR_RE.search(body)
    if bad is not None:
        raise PermanentBackendError(
            f"work queue {url}: send refused: the body holds U+{ord(bad[0]):04X} at offset "
            f"{bad.start()}, which queue services do not carry; send JSON (it escapes control "
            "characters)", "rejected")
    data = body.encode("utf-8")
    if len(data) > MAX_BODY_BYTES:
        raise PermanentBackendError(
            f"work queue {url}: send refused: the body is {len(data)} bytes, more than "
            f"{MAX_BODY_BYTES}; put the data in an object and send its name", "rejected")
    return data


def lease_seconds(url: str, lease_s: float, most: float = MAX_LEASE_S) -> int:
    """The services count visibility timeouts in whole seconds: `lease_s`, rounded up."""
    if not 0 < lease_s <= most:
        raise PermanentBackendError(
            f"work queue {url}: a lease of {lease_s:g} s is out of range; give 0 < lease ≤ "
            f"{most:g} s", "rejected")
    return math.ceil(lease_s)


async def poll(wait_s: float, attempt: Callable[[float], Awaitable[list[QueueMessage]]],
               first_pause_s: float = 0.1, max_pause_s: float = 1.0) -> list[QueueMessage]:
    """Call `attempt(seconds it may wait)` until it returns messages or `wait_s` has passed;
    at least once. Between attempts that came back empty at once (no long polling), pauses
    that double up to `max_pause_s`: every poll of an idle queue is a billed request."""
    deadline = time.monotonic() + max(0.0, wait_s)
    pause = first_pause_s
    while True:
        left = deadline - time.monotonic()
        found = await attempt(max(0.0, left))
        left = deadline - time.monotonic()
        if found or left <= 0:
            return found
        await asyncio.sleep(min(pause, left))
        pause = min(2 * pause, max_pause_s)
