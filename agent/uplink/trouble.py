"""The uplink's pauses: a backend that refuses (credentials, permissions, a missing container)
and an index that cannot record uploads (disk full). Each pauses every worker for a while and
is logged once per episode instead of once per chunk and worker."""

from __future__ import annotations

import logging
import time

from agent.config.settings import UplinkSettings
from agent.errors import DiskFullError, PermanentBackendError
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.store.store import Store
from agent.uplink.backend_check import BackendHealth

log = logging.getLogger("skyferry.uplink")
INDEX_FULL_PAUSE_S = 2.0  # the store's disk is full: wait this long between tries


class Trouble:
    def __init__(self, settings: UplinkSettings, metrics: Metrics, store: Store) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        # Uploads are paused until this monotonic time.
        self.paused_until = 0.0
        self._refusal: str | None = None
        self._index_full_logged = False
        # Set by the daemon: the backend check (agent/uplink/backend_check.py) holds uploads back
        # while the backend refuses, and hears of refusals met by uploads.
        self.health: BackendHealth | None = None

    def refused(self, e: PermanentBackendError) -> None:
        """Credentials, permissions or a missing container: retrying now cannot help."""
        self.paused_until = time.monotonic() + self.settings.retry_max_s
        if self.health is not None:
            # One line per change of the backend's state, shared with its checks; uploads
            # wait until a check says ok again.
            self.health.refused_upload(e)
            return
        if self._refusal != e.kind:
            self._refusal = e.kind
            log_event(log, logging.ERROR, "backend_refused",
                      f"{e}; uploads pause and are tried again every "
                      f"{self.settings.retry_max_s:g}s; the queue is kept", kind=e.kind)

    def recovered(self) -> None:
        if self._refusal is not None:
            self._refusal = None
            log_event(log, logging.INFO, "backend_recovered", "the backend accepts uploads again")

    def index_full(self, e: DiskFullError) -> None:
        """Every worker pauses a moment; logged once until an upload is recorded again."""
        self.paused_until = time.monotonic() + INDEX_FULL_PAUSE_S
        self.store.give_up_spare()  # the retry finds room (the headroom was taken)
        if not self._index_full_logged:
            self._index_full_logged = True
            self.metrics.errors.labels("disk_full").inc()
            log_event(log, logging.ERROR, "uplink_disk_full",
                      f"uploads cannot be recorded: {e}; uploads pause and are tried again "
                      f"every {INDEX_FULL_PAUSE_S:g}s (recording them is what frees space)")

    def index_writable(self) -> None:
        if self._index_full_logged:
            self._index_full_logged = False
            log_event(log, logging.INFO, "uplink_resumed", "uploads are recorded again")
