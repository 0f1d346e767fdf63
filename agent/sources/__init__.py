"""Data sources: spool folders, `skyferry put`, MQTT subscriptions (sources/mqtt.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from agent.ingest.requests import IngestRequest, IngestResult, PackResult

Ingest = Callable[[IngestRequest], Awaitable[IngestResult]]
IngestPack = Callable[[list[IngestRequest]], Awaitable[PackResult]]
