"""The link monitor: does the backend answer right now? Probes with hysteresis, RTT, events.

A probe is the cheapest thing that proves the path to the backend works:
- `file:///path`: the folder can be stat'ed and written to (a mounted share that went away);
- `tcp://host:port`: a TCP connection is accepted;
- `http(s)://host[:port]/path`: a TCP (and TLS) connection plus a `HEAD` request; any HTTP answer
  counts, even 403: the link is up, credentials are the uplink's business.
`auto` picks one from [backend]: its folder for file://, its endpoint (or the public service)
for object stores.

Hysteresis: the link goes down after `down_after` consecutive failures and up after `up_after`
consecutive successes. A probe whose result differs from the current state is confirmed at once
(without waiting a whole interval), so a loss is noticed within
`probe_interval + down_after x probe_timeout` and a return within about a second (a link that
is down is probed every `DOWN_PROBE_INTERVAL_S`, or `probe_interval` if shorter). Each
window start triggers a probe at once, so a pass that begins with the link already up opens
the gate at AOS rather than one interval later.

Every probe result also feeds the learned availability model (agent/windows/learned.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from agent.config.settings import LinkSettings
from agent.obs.logs import log_event
from agent.windows.learned import LearnedModel

Clock = Callable[[], float]
log = logging.getLogger("skyferry.link")
# While the link is down, probe at least this often: an intermittent (LEO) link comes back after
# seconds, and each second spent not noticing is a second of contact lost. Probing a dead link
# costs nothing.
DOWN_PROBE_INTERVAL_S = 1.0


class ProbeFailed(Exception):
    """The probe target did not answer as a working link would."""


class Probe(Protocol):
    description: str

    async def __call__(self, timeout_s: float) -> None:
        """Return when the link works; raise (ProbeFailed, OSError, TimeoutError) when not."""


class FolderProbe:
    """A local or mounted backend folder: reachable and writable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"folder {path}"

    def _check(self) -> None:
        if not self.path.is_dir():
            raise ProbeFailed(f"{self.path} is not a reachable folder")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ProbeFailed(f"{self.path} is not writable")

    async def __call__(self, timeout_s: float) -> None:
        # In a thread: a hung network mount blocks stat(); the timeout still fires (the thread
        # is left to finish on its own).
        async with asyncio.timeout(timeout_s):
            await asyncio.to_thread(self._check)


class TcpProbe:
    """A TCP connect (and, for http/https, a HEAD request answered with any HTTP status)."""

    def __init__(self, host: str, port: int, *, http_path: str | None = None,
                 tls: bool = False) -> None:
        self.host, self.port = host, port
        self.http_path = http_path
        self.tls = tls
        scheme = ("https" if tls else "http") if http_path is not None else "tcp"
        self.description = f"{scheme}://{host}:{port}{http_path or ''}"

    async def __call__(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            ctx = ssl.create_default_context() if self.tls else None
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=ctx, server_hostname=self.host if self.tls else None)
            try:
                if self.http_path is not None:
                    writer.write(f"HEAD {self.http_path} HTTP/1.1\r\nHost: {self.host}\r\n"
                                 "User-Agent: skyferry-link-probe\r\nConnection: close\r\n\r\n"
                                 .encode())
                    await writer.drain()
                    status = await reader.readline()
                    if not status.startswith(b"HTTP/"):
                        raise ProbeFailed(f"{self.description} did not answer HTTP "
                                          f"(got {status[:40]!r})")
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()


def parse_probe(target: str) -> Probe:
    """A probe from an explicit target (file://, tcp://, http://, https://)."""
    parts = urlsplit(target)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return FolderProbe(Path(unquote(parts.path)))
    if scheme in ("tcp", "http", "https"):
        if not parts.hostname:
            raise ValueError(f"{target!r} names no host")
        default = {"tcp": None, "http": 80, "https": 443}[scheme]
        port = parts.port or default
        if port is None:
            raise ValueError(f"{target!r} needs a port: tcp://host:port")
        path = (parts.path or "/") if scheme != "tcp" else None
        return TcpProbe(parts.hostname, port, http_path=path, tls=scheme == "https")
    raise ValueError(f"{target!r} is not a probe target; use file:///path, tcp://host:port, "
                     "http://host[:port]/path, https://..., auto or none")


def make_probe(settings: LinkSettings, auto: str | None) -> Probe | None:
    """The configured probe, or None for `none` (the link is taken to be always up).

    `auto` is what `probe = "auto"` probes: the backend's own target (the backend registry's
    `probe_target`), None when there is nothing sensible.
    """
    target = settings.probe
    if target == "none":
        return None
    if target == "auto":
        if auto is None:
            return None
        target = auto
    return parse_probe(target)


class LinkMonitor:
    """Probes at a steady pace, decides up/down with hysteresis, tells the gate."""

    def __init__(self, probe: Probe, settings: LinkSettings, clock: Clock, *,
                 on_change: Callable[[bool], None] | None = None,
                 model: LearnedModel | None = None,
                 throughput: Callable[[], float | None] | None = None,
                 next_window_start: Callable[[float], float | None] | None = None,
                 metrics: Any = None) -> None:
        self.probe = probe
        self.settings = settings
        self.clock = clock
        self.on_change = on_change
        self.model = model
        self.throughput = throughput or (lambda: None)
        self.next_window_start = next_window_start
        self.metrics = metrics
        self.up = True  # until the first probe says otherwise: the gate starts as before
        self.rtt_s: float | None = None  # EWMA of probe round trips
        self.probes = 0
        self.last_error: str | None = None
        self._streak = 0  # consecutive results that disagree with the current state
        self._last_t: float | None = None
        self._poke = asyncio.Event()
        self.changes: list[tuple[float, bool]] = []  # (clock time, up) of each transition

    def poke(self) -> None:
        """Probe now (a window is about to start, or an upload failed)."""
        self._poke.set()

    def suspect(self, reason: str) -> None:
        """The uplink's own traffic says the link is gone (agent/uplink/link_watch.py): down
        now, without waiting for probes to time out; probes say when it is back
        (`up_after` good ones, at once if it never went)."""
        if not self.up:
            return
        self.last_error = reason
        self._set(False)
        self._publish()
        self.poke()

    async def probe_once(self) -> bool:
        start = time.monotonic()
        try:
            await self.probe(self.settings.timeout_s)
        except (ProbeFailed, OSError, TimeoutError, ssl.SSLError, ValueError) as e:
            self.last_error = str(e) or type(e).__name__
            ok = False
        else:
            rtt = time.monotonic() - start
            self.rtt_s = rtt if self.rtt_s is None else 0.7 * self.rtt_s + 0.3 * rtt
            ok = True
        self.probes += 1
        self._record(ok)
        return ok

    def _record(self, ok: bool) -> None:
        now = self.clock()
        if self.model is not None and self.settings.learn:
            # What held since the last probe is what this probe found; a long silence (the
            # daemon was stopped, the clock jumped) is not attributed to it.
            last = self._last_t
            span = self.settings.interval_s if last is None else now - last
            if 0 < span <= 3 * self.settings.interval_s:
                self.model.observe(now - span, now, ok, self.throughput() if ok else None)
        self._last_t = now
        if ok == self.up:
            self._streak = 0
        else:
            self._streak += 1
            need = self.settings.up_after if ok else self.settings.down_after
            if self._streak >= need:
                self._set(ok)
        self._publish()

    def _set(self, up: bool) -> None:
        self.up = up
        self._streak = 0
        now = self.clock()
        self.changes.append((now, up))
        if up:
            log_event(log, logging.INFO, "link_up", f"link up ({self.probe.description} answers)",
                      rtt_ms=None if self.rtt_s is None else round(self.rtt_s * 1000, 1))
        elif self._in_window(now):
            log_event(log, logging.WARNING, "link_down",
                      f"link lost inside a window: {self.probe.description}: "
                      f"{self.last_error}; the gate closes, uploads under way wait for the "
                      "link (or are re-sent if it does not return)")
        else:  # a scheduled link going away outside its windows is what was expected
            log_event(log, logging.INFO, "link_down",
                      f"link down outside a window: {self.probe.description}: "
                      f"{self.last_error}")
        if self.on_change is not None:
            self.on_change(up)

    def _in_window(self, now: float) -> bool:
        # No window ahead means one is open now (or the link is always usable).
        return self.next_window_start is None or self.next_window_start(now) is None

    def _publish(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.link_up.set(1 if self.up else 0)
        if self.rtt_s is not None:
            m.link_rtt.set(self.rtt_s)
        if self.model is not None:
            h = self.model.hits
            # The share of forecast up-time the link confirmed; recall and accuracy are in
            # `skyferry windows --json`.
            if h.precision is not None:
                m.forecast_hit_rate.set(h.precision)

    def _delay(self) -> float:
        if self._streak > 0:
            return 0.0  # confirm a change at once: hysteresis without a whole interval's wait
        delay = self.settings.interval_s
        if not self.up:
            delay = min(delay, DOWN_PROBE_INTERVAL_S)
        if self.next_window_start is not None:
            now = self.clock()
            nxt = self.next_window_start(now)
            if nxt is not None and nxt > now:
                delay = min(delay, nxt - now)
        return delay

    async def run(self) -> None:
        while True:
            await self.probe_once()
            self._poke.clear()
            delay = self._delay()
            if delay > 0:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives as the event fires, and shutdown would hang.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._poke.wait()


async def pre_pass(next_window_start: Callable[[float], float | None], lead_s: float,
                   clock: Clock, monitor: LinkMonitor | None,
                   warm_up: Callable[[], Awaitable[object]] | None,
                   timeout_s: float = 10.0) -> None:
    """`lead_s` before each window: probe the link and warm up the backend connection.

    Warming up is one cheap request (a HEAD of a key that need not exist): DNS, TCP, TLS and
    credential refresh happen before AOS instead of eating into the pass.
    """
    done_for: float | None = None
    while True:
        now = clock()
        nxt = next_window_start(now)
        if nxt is None or nxt == done_for:
            await asyncio.sleep(1.0)
            continue
        wait = nxt - lead_s - now
        if wait > 0:
            # Re-check at least every second: the clock may jump, the schedule may change.
            await asyncio.sleep(min(wait, 1.0))
            continue
        done_for = nxt
        log_event(log, logging.INFO, "pre_pass", "window ahead: probing the link and warming up "
                  "the backend", window_start=nxt, in_s=round(nxt - now, 1))
        if monitor is not None:
            monitor.poke()
        if warm_up is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout_s):
                    await warm_up()
