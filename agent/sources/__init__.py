"""Data sources: spool folders, `skyferry put`, MQTT subscriptions (sources/mqtt.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    # Types only: the `skyferry put` client (put_client.py) is in this package, and a CLI
    # command must not load the pipeline and the store just to send a request.
    from agent.ingest.requests import IngestRequest, IngestResult, PackResult

Ingest: TypeAlias = "Callable[[IngestRequest], Awaitable[IngestResult]]"
IngestPack: TypeAlias = "Callable[[list[IngestRequest]], Awaitable[PackResult]]"
