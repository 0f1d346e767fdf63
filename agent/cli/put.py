"""`skyferry put FILE...`: queue files now, through the daemon's socket or, when no daemon
runs, straight into the store (the daemon uploads them when it starts)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.common import add_config_argument, load_settings
from agent.errors import SkyferryError, StoreLockedError

if TYPE_CHECKING:
    from agent.config.settings import Settings

NAME = "put"
HELP = "queue files now (through the daemon, or directly)"

PUT_WAIT_S = 30.0  # a starting daemon holds the store before its socket answers


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--priority", help="priority class (default: [put] priority)")
    p.add_argument("--name", help="name to restore the file as (only with one file)")


def main(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    priority = args.priority or settings.put.priority
    if priority not in [c.name for c in settings.classes]:
        print(f"skyferry put: error: unknown class {priority!r}; use one of: "
              f"{', '.join(c.name for c in settings.classes)}", file=sys.stderr)
        return 2
    if args.name and len(args.files) != 1:
        print("skyferry put: error: --name needs exactly one file", file=sys.stderr)
        return 2
    sender = _PutSender(settings)
    try:
        failed = sum(not _put_one(sender, f, args.name, priority) for f in args.files)
    finally:
        sender.close()
    return 1 if failed else 0


def _put_one(sender: _PutSender, f: Path, name: str | None, priority: str) -> bool:
    from agent.sources.put_client import open_for_put

    path = f.absolute()
    try:  # opened here, with the caller's rights: the daemon never opens a path
        fd = open_for_put(path)
    except SkyferryError as e:
        print(f"skyferry put: {e}", file=sys.stderr)
        return False
    try:
        reply = sender.put(fd, path, name or f.resolve().name, priority)
    finally:
        os.close(fd)
    if not reply.get("ok"):
        print(f"skyferry put: {f}: {reply.get('error')}", file=sys.stderr)
        return False
    note = " (already queued)" if reply.get("duplicate") else ""
    print(f"{f}: accepted as object {reply['object']}{note}")
    return True


class _PutSender:
    """Through the daemon's socket when it answers, else straight into the store; a daemon
    that is starting holds the store before it answers, so both are tried for a while."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.direct: _DirectIngest | None = None

    def put(self, fd: int, path: Path, name: str, priority: str) -> dict[str, Any]:
        from agent.sources.put import PUT_SOURCE
        from agent.sources.put_client import request_put

        deadline = time.monotonic() + PUT_WAIT_S
        while True:
            if self.direct is None:
                reply = request_put(self.settings.put.socket, fd, path, name, priority)
                if reply is not None:
                    return reply
            try:
                self.direct = self.direct or _DirectIngest(self.settings)
            except StoreLockedError as e:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(f"{e} (waited {PUT_WAIT_S:g}s)") from None
                time.sleep(0.1)
                continue
            return self.direct.put(fd, path, name, priority, PUT_SOURCE)

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()


class _DirectIngest:
    """No daemon runs: write into the store ourselves; the daemon uploads it when it starts.

    The same Store + Pipeline the daemon builds (agent/daemon/wiring.py), without uplink,
    sources or telemetry: a put needs only the ingest half of the flow.
    """

    def __init__(self, settings: Settings) -> None:
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
                                 settings.compression, seal_thread=self.seal)

    def put(self, fd: int, path: Path, name: str, priority: str,
            source: str) -> dict[str, Any]:
        from agent.ingest.requests import IngestRequest
        from agent.sources.put_client import reader_of

        req = IngestRequest(path, source, name, priority, opener=reader_of(fd),
                            seen=os.fstat(fd))
        try:
            r = self.pipeline.ingest_file(req)
        except SkyferryError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "object": r.object_id, "duplicate": r.duplicate_of is not None}

    def close(self) -> None:
        self.seal.shutdown(wait=True)
        self.store.close()
