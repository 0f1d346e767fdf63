"""What a spool tells the operator: one line per path and reason, counts, refusal episodes.

A spool is scanned every second or so; without this bookkeeping one unreadable file or a full
disk would write the same line at every scan.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from agent.config.settings import SpoolSettings
from agent.errors import DiskFullError, QuotaExceededError, SourceUnsettledError
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.sources.spool_scan import printable

log = logging.getLogger("skyferry.spool")
# While the store refuses (quota or disk full) scans back off, doubling up to this.
REFUSED_BACKOFF_MAX_S = 5.0
# Why a file could not be opened that a later scan may not see again: it changed, went, was
# swapped for a link, or the process ran out of descriptors (None: opened, changed while read).
_TRANSIENT = (None, errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EMFILE, errno.ENFILE)


class SpoolReport:
    def __init__(self, settings: SpoolSettings, metrics: Metrics | None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.told: dict[str, set[str]] = {}  # path -> reasons logged while it is there
        self._refused_logged: set[str] = set()  # refusal kinds logged this episode
        self._refused_since: float | None = None
        self.backoff_s = 0.0  # added to the scan interval while the store refuses
        self._errors: set[str] = set()  # unexpected errors logged (each once)

    def count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.spool_skipped.labels(self.settings.name, reason).inc()

    def tell(self, name: str, reason: str, why: str, level: int = logging.WARNING) -> None:
        """One line per path and reason while the path is there, and one count."""
        told = self.told.setdefault(name, set())
        if reason in told:
            return
        told.add(reason)
        self.count(reason)
        shown = printable(name)
        log_event(log, level, "spool_skipped", f"spool {self.settings.name}: {shown}: "
                  f"{printable(why)}", source=self.settings.name, file=shown, reason=reason)

    def not_taken(self, name: str, busy: bool, open_errno: int | None, e: Exception) -> bool:
        """Say (once) why the file `name` was not ingested. True: it was not settled after all,
        so it is looked at anew once it settles; False: retrying cannot help until its mode,
        owner or content changes. `busy`: open for writing; `open_errno`: why it could not be
        opened (None: it was opened, or never tried)."""
        shown = printable(name)
        if busy:
            log_event(log, logging.DEBUG, "file_busy", f"{shown} is still open for writing",
                      source=self.settings.name, file=shown)
            return True
        if isinstance(e, SourceUnsettledError):
            # Written to between the scan and the open and still there, e.g. by a producer
            # that appends just as the daemon takes the file: nothing was read, nothing went
            # wrong. Like a writer above, it is just not settled yet: no line for the operator.
            log_event(log, logging.DEBUG, "file_unsettled", printable(str(e)),
                      source=self.settings.name, file=shown)
            return True
        if open_errno in _TRANSIENT:  # changed or gone while read, or swapped since the scan
            self.tell(name, "changed", "changed, went away or was replaced while it was being "
                      "ingested; left in place, taken once it settles", logging.INFO)
            log_event(log, logging.DEBUG, "ingest_failed", printable(str(e)),
                      source=self.settings.name, file=shown)
            return True
        assert open_errno is not None
        unreadable = open_errno in (errno.EACCES, errno.EPERM)
        self.tell(name, "unreadable" if unreadable else "unopenable",
                  f"cannot be opened by the service ({os.strerror(open_errno)}); left in "
                  "place, tried again once its mode, owner or content changes")
        return False

    def unexpected(self, e: Exception) -> None:
        what = f"{type(e).__name__}: {e}"
        if what in self._errors or len(self._errors) >= 100:
            return
        self._errors.add(what)
        self.count("error")
        log_event(log, logging.ERROR, "spool_error",
                  f"spool {self.settings.name}: scan failed, retried at the next one: "
                  f"{printable(what)}", source=self.settings.name)

    # ---- quota refusals ----------------------------------------------------------------------

    def refusals_over(self) -> None:
        if self._refused_since is None:
            return
        took = time.monotonic() - self._refused_since
        log_event(log, logging.INFO, "ingest_resumed",
                  f"spool {self.settings.name}: nothing refused any more after {took:.1f}s of "
                  f"refusals ({', '.join(sorted(self._refused_logged))})",
                  source=self.settings.name, refused_s=took)
        self._refused_logged.clear()
        self._refused_since = None
        self.backoff_s = 0.0

    def refused(self, name: str, e: QuotaExceededError) -> None:
        # Logged once per episode (again only if the reason changes, quota vs disk), not per
        # file and scan: a full disk can last hours.
        kind = "disk_full" if isinstance(e, DiskFullError) else "quota"
        if self._refused_since is None:
            self._refused_since = time.monotonic()
        self.backoff_s = min(REFUSED_BACKOFF_MAX_S,
                             max(self.settings.scan_interval_s, 2 * self.backoff_s))
        if kind not in self._refused_logged:
            self._refused_logged.add(kind)
            log_event(log, logging.WARNING, "ingest_refused",
                      f"spool {self.settings.name}: {printable(name)} stays in place: {e} "
                      f"(retried every {REFUSED_BACKOFF_MAX_S:g}s at most; not logged again "
                      "until nothing is refused)",
                      source=self.settings.name, file=printable(name), reason=kind)
        else:  # for diagnosis only: where the disk ran out (pre-check, staging, index)
            log_event(log, logging.DEBUG, "ingest_refused_again", f"{printable(name)}: {e}",
                      source=self.settings.name, file=printable(name), reason=kind)
