"""Where `skyferry put` sends a group of files: the daemon's socket when it answers, else
straight into the store (the daemon uploads them when it starts)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import SkyferryError, StoreLockedError

if TYPE_CHECKING:
    from agent.config.settings import Settings
    from agent.ingest.requests import IngestRequest
    from agent.sources.spool_scan import Candidate

PUT_WAIT_S = 30.0  # a starting daemon holds the store before its socket answers

Answers = dict[str, dict[str, Any]]  # name -> {"object", "duplicate"} or {"error"}


class PutSender:
    """Through the daemon's socket when it answers, else straight into the store; a daemon
    that is starting holds the store before it answers, so both are tried for a while.
    Groups may be sent from several threads at once.

    `settings` reads the whole config, called only when no daemon answers (a put through the
    daemon reads only agent.config.intake.read_put_view's sections and loads no pipeline)."""

    def __init__(self, socket: Path, settings: Callable[[], Settings]) -> None:
        self.socket = socket
        self.settings = settings
        self.direct: _DirectIngest | None = None
        self._lock = threading.Lock()

    def send(self, group: list[Candidate], priority: str) -> Answers:
        """Open the group's files (with the caller's rights) and queue them; one answer per
        file, by name."""
        from agent.sources.put_walk import open_listed

        answers: Answers = {}
        opened: list[tuple[Candidate, int]] = []
        try:
            for c in group:
                try:
                    opened.append((c, open_listed(c)))
                except SkyferryError as e:
                    answers[c.name] = {"error": str(e)}
            if opened:
                answers.update(self._send_open(opened, priority))
        finally:
            for _, fd in opened:
                os.close(fd)
        return answers

    def _send_open(self, opened: list[tuple[Candidate, int]], priority: str) -> Answers:
        # A key, config or store problem is raised: one line for the whole command (exit 2).
        reply = self._exchange(opened, priority)
        if not reply.get("ok"):
            return {c.name: {"error": reply.get("error")} for c, _ in opened}
        if "files" in reply:
            return {a["name"]: a for a in reply["files"]}
        return {opened[0][0].name: reply}

    def _exchange(self, opened: list[tuple[Candidate, int]], priority: str) -> dict[str, Any]:
        from agent.sources.put_client import request_put, request_put_files

        sock = self.socket
        deadline = time.monotonic() + PUT_WAIT_S
        while True:
            if self.direct is None:
                if len(opened) == 1:
                    c, fd = opened[0]
                    reply = request_put(sock, fd, c.path, c.name, priority)
                else:
                    reply = request_put_files(sock, [fd for _, fd in opened],
                                              [(str(c.path), c.name) for c, _ in opened],
                                              priority)
                if reply is not None:
                    return reply
            try:
                direct = self._direct()
            except StoreLockedError as e:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(f"{e} (waited {PUT_WAIT_S:g}s)") from None
                time.sleep(0.1)
                continue
            return direct.put(opened, priority)

    def _direct(self) -> _DirectIngest:
        with self._lock:
            if self.direct is None:
                self.direct = _DirectIngest(self.settings())
            return self.direct

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()


class _DirectIngest:
    """No daemon runs: write into the store ourselves; the daemon uploads it when it starts.

    The same Store + Pipeline the daemon builds (agent/daemon/wiring.py), without uplink,
    sources or telemetry: a put needs only the ingest half of the flow.
    """

    def __init__(self, settings: Settings) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from agent.format.keys import load_edge_keys
        from agent.ingest.pipeline import Pipeline
        from agent.store.store import Store

        # Keys first: a missing or unsafe key must not create or touch the store.
        keys = load_edge_keys(settings.keys.recipient_public, settings.keys.signing_key,
                              settings.keys.dedup_key)
        try:
            self.store = Store(settings.site.state_dir, settings.classes,
                               settings.store.quota_bytes)
        except StoreLockedError:
            raise StoreLockedError(
                f"the daemon holds {settings.site.state_dir} but does not answer on "
                f"{settings.put.socket}; check `[put] socket` and the daemon's log") from None
        # The same second sealing thread the daemon gives its pipeline (agent/host/blocking.py).
        self.seal = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyferry-seal")
        self.pipeline = Pipeline(settings.site.id, keys, self.store, settings.chunking,
                                 settings.compression, seal_thread=self.seal,
                                 dedup_horizon_s=settings.uplink.dedup_horizon_s)

    def put(self, opened: list[tuple[Candidate, int]], priority: str) -> dict[str, Any]:
        """As the daemon answers: one file alone, or many (the small ones as one pack)."""
        from agent.sources.put_client import PUT_SOURCE

        reqs = [self._request(c, fd, PUT_SOURCE, priority) for c, fd in opened]
        try:
            if len(reqs) == 1:
                r = self.pipeline.ingest_file(reqs[0])
                return {"ok": True, "object": r.object_id,
                        "duplicate": r.duplicate_of is not None}
            small = [r for r in reqs
                     if r.seen is not None and self.pipeline.is_packed(r.seen.st_size)]
            return {"ok": True, "files": self._put_many(reqs, small)}
        except SkyferryError as e:
            return {"ok": False, "error": str(e)}

    def _put_many(self, reqs: list[IngestRequest], small: list[IngestRequest]
                  ) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in reqs:
            if r not in small:
                one = self.pipeline.ingest_file(r)
                out[r.name] = {"name": r.name, "object": one.object_id,
                               "duplicate": one.duplicate_of is not None}
        if small:
            pack = self.pipeline.ingest_pack(small)
            for r in small:
                done = pack.accepted.get(r.name)
                why = pack.failed.get(r.name)
                out[r.name] = ({"name": r.name, "object": done.object_id,
                                "duplicate": done.duplicate_of is not None} if done else
                               {"name": r.name, "error": str(why) if why else "not stored: "
                                "another file of this request has the same name"})
        return [out[r.name] for r in reqs]

    @staticmethod
    def _request(c: Candidate, fd: int, source: str, priority: str) -> IngestRequest:
        from agent.ingest.requests import IngestRequest
        from agent.sources.put_client import reader_of

        return IngestRequest(Path(c.path), source, c.name, priority, opener=reader_of(fd),
                             seen=os.fstat(fd))

    def close(self) -> None:
        self.seal.shutdown(wait=True)
        self.store.close()
