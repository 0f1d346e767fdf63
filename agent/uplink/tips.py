"""The site's tip publisher: builds the next tip (agent/format/tips.py) from the store's
numbering and sends it after manifests were acknowledged and at each window opening, whenever
the site's history changed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import blake3

from agent.backends.protocol import Backend
from agent.errors import BackendError, DiskFullError, ObjectConflictError
from agent.format.crypto import EdgeKeys
from agent.format.manifest import now_iso
from agent.format.tips import Tip, coarsen, seal_tip, tip_key
from agent.host.blocking import RunBlocking
from agent.obs.logs import log_event
from agent.obs.metrics import Metrics
from agent.store import seqbook
from agent.store.store import Store
from agent.uplink.attempts import Attempts
from agent.uplink.gate import Gate

log = logging.getLogger("skyferry.uplink")

# Manifests are acknowledged in bursts: a tip goes out this long after the last one asked for
# it, so a window's manifests cost a few tips, not one each.
TIP_SETTLE_S = 0.5
TIP_INTERVAL_S = 5.0
TIP_LINK_SHARE = 100


@dataclass(frozen=True)
class BuiltTip:
    key: str
    blob: bytes
    stream: str
    n: int
    digest: str  # of what it says, to skip a tip that would say nothing new


class TipWriter:
    """Builds the site's next tip from the store (blocking: call it through the executor)."""

    def __init__(self, site: str, keys: EdgeKeys, store: Store) -> None:
        self.site, self.keys, self.store = site, keys, store
        self.key_id = seqbook.key_id(keys.signing_key.public_key())

    def build(self) -> BuiltTip | None:
        """The next tip, or None when there is no history yet or nothing changed since the
        last tip sent."""
        st = self.store.history_state(self.key_id)
        if st is None:
            return None
        queued, void = coarsen(st.queued), coarsen(st.void)
        digest = blake3.blake3(repr((st.highest, queued, void)).encode()).hexdigest()
        if self.store.get_meta(f"tip:{st.stream}") == digest:
            return None
        tip = Tip(self.site, st.stream, st.next_tip, now_iso(), st.highest, queued, void)
        return BuiltTip(tip_key(self.site, st.stream, tip.n), seal_tip(tip, self.keys),
                        st.stream, tip.n, digest)

    def sent(self, built: BuiltTip, written: bool) -> None:
        """Tip `n` is in the cloud (or its key was taken: the next tip takes n + 1)."""
        self.store.tip_sent(built.stream, built.n)
        if written:
            self.store.set_meta(f"tip:{built.stream}", built.digest)


Shield = Callable[[Coroutine[Any, Any, None]], Awaitable[None]]


class TipPublisher:
    """Sends the writer's tips through the uplink's requests (`attempts`); `shielded` runs the
    store's bookkeeping so that cancellation cannot cut it off; `due` asks for a tip."""

    def __init__(self, writer: TipWriter, due: asyncio.Event, gate: Gate, backend: Backend,
                 attempts: Attempts, run_blocking: RunBlocking, metrics: Metrics,
                 retry_max_s: float, shielded: Shield) -> None:
        self.writer, self.due, self.gate, self.backend = writer, due, gate, backend
        self.attempts, self.run_blocking, self.metrics = attempts, run_blocking, metrics
        self.retry_max_s = retry_max_s
        self._shielded = shielded

    async def loop(self) -> None:
        """Send a tip at each window opening and after manifests were acknowledged."""
        opened = -1
        while True:
            await self.gate.wait_open()
            if self.gate.windows_opened != opened:
                opened = self.gate.windows_opened
                self.due.set()  # evictions and voids happen between windows too
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.due.wait()
            if not self.due.is_set():
                continue
            await asyncio.sleep(TIP_SETTLE_S)
            self.due.clear()
            started = time.monotonic()
            try:
                await self.attempts.while_open(self.send)
                # Tips are few: at least TIP_INTERVAL_S apart, and a large one (a fragmented
                # backlog) takes at most 1/TIP_LINK_SHARE of the link's time.
                took = time.monotonic() - started
                await asyncio.sleep(max(TIP_INTERVAL_S - took, took * (TIP_LINK_SHARE - 1)))
            except Exception as e:  # a tip never stops the uploads: one line per try
                self.due.set()  # tried again after a pause
                known = isinstance(e, BackendError | DiskFullError)
                level = logging.WARNING if known else logging.ERROR
                log_event(log, level, "tip_failed", f"the site's tip was not sent: {e}; "
                          f"tried again in {self.retry_max_s:g}s")
                await asyncio.sleep(self.retry_max_s)

    async def send(self) -> BuiltTip | None:
        """Build and send the site's tip if its history changed since the last one sent."""
        built: BuiltTip | None = await self.run_blocking(self.writer.build)
        if built is None:
            return None
        try:
            written = await self.attempts.with_retries(
                lambda n: self.backend.put_if_absent(built.key, built.blob, probe_first=n > 1))
        except ObjectConflictError:
            written = False  # the key is taken (not by this site): the next tip takes n + 1

        async def record() -> None:
            await self.run_blocking(self.writer.sent, built, written)

        await self._shielded(record())
        if not written:
            self.due.set()
            return None
        self.metrics.sent_bytes.labels("tip").inc(len(built.blob))
        log_event(log, logging.DEBUG, "tip_sent", "tip sent", key=built.key)
        return built
