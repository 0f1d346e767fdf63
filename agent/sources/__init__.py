"""Data sources: spool folders, `skyferry put` (MQTT comes with issue 5)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from agent.pipeline import IngestRequest, IngestResult

Ingest = Callable[[IngestRequest], Awaitable[IngestResult]]
