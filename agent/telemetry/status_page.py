"""The metrics port: Prometheus `/metrics`, a status page for the field operator at `/`, and
`/status.json`.

It runs prometheus-client's threaded WSGI server, so scrapes and page loads never wait on the
event loop, with a cap on connections and a deadline for each (anyone who can reach the port
can open connections); the page reads the latest `Snapshot` (replaced whole by the loop, so a reader
always sees one consistent picture). No framework: one HTML string, refreshed by the browser.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from agent.config.units import format_duration, format_size
from agent.host.blocking import Serve
from agent.obs.logs import Throttled, iso
from agent.telemetry.snapshot import Snapshot, WindowView

REFRESH_S = 5
HTTP_MAX_CONNECTIONS = 16
HTTP_IO_TIMEOUT_S = 5.0  # an idle or half-sent request is closed after this
HTTP_DEADLINE_S = 10.0  # and any connection after this, however slowly it trickles
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")
log = logging.getLogger("skyferry.telemetry")
StartResponse = Callable[..., Any]


class _Discard(io.StringIO):
    def write(self, s: str) -> int:
        return len(s)


class _QuietHandler(WSGIRequestHandler):
    timeout = HTTP_IO_TIMEOUT_S  # each read and write of the connection

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not worth a journal line each."""

    def get_stderr(self) -> io.StringIO:
        # wsgiref prints a traceback there when a client times out or leaves mid-answer.
        return _Discard()

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # timed out, reaped, or the client left
            super().handle()


class _BoundedServer(ThreadingWSGIServer):
    """prometheus-client's server (a thread per connection), with a cap on connections and
    a deadline for each: outsiders cannot pin threads by opening connections and sending
    nothing, or a byte at a time."""

    request_queue_size = 128
    max_connections = HTTP_MAX_CONNECTIONS

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._mu = threading.Lock()
        self._busy = Throttled()
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._busy.log(log, logging.WARNING, "http_busy",
                           f"metrics port: {self.max_connections} connections open, the most "
                           "allowed; a new one was answered 503")
            with contextlib.suppress(OSError):  # a fresh socket's buffer takes these bytes
                request.send(_BUSY, socket.MSG_DONTWAIT)
            self.shutdown_request(request)
            return
        with self._mu:
            self._deadlines[request] = time.monotonic() + HTTP_DEADLINE_S
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.shutdown_request(request)
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        with self._mu:  # from here on the reaper leaves this socket alone
            self._deadlines.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """serve_forever calls this at each poll: end connections past their deadline
        (their thread sees the connection closed and finishes)."""
        now = time.monotonic()
        with self._mu:
            for request, deadline in self._deadlines.items():
                if deadline < now:
                    with contextlib.suppress(OSError):
                        request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's failure is its client's business: no traceback on stderr."""


class _V6Server(_BoundedServer):
    address_family = socket.AF_INET6


class StatusServer:
    """Serves /metrics, / and /status.json on one port, from a thread the daemon gives it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self.snapshot: Snapshot | None = None
        self._metrics_app = make_wsgi_app(registry)
        server_class = _V6Server if ":" in host else _BoundedServer
        self._server = make_server(host, port, self._app, server_class, handler_class=_QuietHandler)
        self.port = self._server.server_port

    def start(self, serve: Serve) -> None:
        # Polled 10 times a second rather than twice: SIGTERM waits for the poll to end.
        serve("skyferry-http", lambda: self._server.serve_forever(poll_interval=0.1))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/", "/status", "/index.html"):
            body = render_page(self.snapshot).encode()
            ctype = "text/html; charset=utf-8"
        elif path == "/status.json":
            snap = self.snapshot
            body = json.dumps(snap.to_json() if snap else {"starting": True}).encode()
            ctype = "application/json"
        else:
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        start_response("200 OK", [("Content-Type", ctype), ("Cache-Control", "no-store"),
                                  ("Content-Length", str(len(body)))])
        return [body]


_CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:1.2em;color:#1d2433;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.2em 0 .4em}
.muted{color:#667} .cards{display:flex;gap:.8em;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:.6em 1em;min-width:11em}
.card b{display:block;font-size:1.3em} .ok{color:#17803d} .bad{color:#b3261e} .warn{color:#a15c00}
table{border-collapse:collapse;background:#fff;border:1px solid #dde}
th,td{padding:.3em .8em;border-bottom:1px solid #eef;text-align:right}
th:first-child,td:first-child{text-align:left}
.tl{position:relative;height:28px;background:#e9ecf2;border:1px solid #ccd;border-radius:4px}
.tl div{position:absolute;top:0;bottom:0;background:#3b82f6;opacity:.85}
.tl .now{background:#b3261e;width:2px;opacity:1}
.ticks{display:flex;justify-content:space-between;font-size:.8em;color:#667}
li{margin:.2em 0} code{font-size:.9em}
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _age(seconds: float | None) -> str:
    """Whole seconds: a field operator reads "3m 12s", not "3m 12.137s"."""
    return "—" if seconds is None else format_duration(float(round(seconds)))


def _timeline(snap: Snapshot) -> str:
    start, span = snap.time, 24 * 3600.0
    bars = []
    for w in snap.timeline:
        a = max(w.start, start)
        b = min(w.end if w.end is not None else start + span, start + span)
        if b <= a:
            continue
        left, width = (a - start) / span * 100, max(0.15, (b - a) / span * 100)
        title = _window_text(w)
        bars.append(f'<div style="left:{left:.3f}%;width:{width:.3f}%" title="{_e(title)}">'
                    "</div>")
    ticks = "".join(f"<span>+{h}h</span>" for h in range(0, 25, 6))
    return (f'<div class="tl">{"".join(bars)}<div class="now" style="left:0"></div></div>'
            f'<div class="ticks">{ticks}</div>')


def _window_text(w: WindowView) -> str:
    end = "open-ended" if w.end is None else iso(w.end)
    rate = "" if w.rate_bps is None else f", {format_size(int(w.rate_bps))}/s"
    return f"{iso(w.start)} → {end} ({w.source}{rate})"


def render_page(snap: Snapshot | None) -> str:
    """The status page: queue by class, the gate and next window, link, MQTT, last problems."""
    head = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="{REFRESH_S}">'
            f"<title>skyferry{'' if snap is None else ' — ' + _e(snap.site)}</title>"
            f"<style>{_CSS}</style></head><body>")
    if snap is None:
        return head + "<h1>skyferry</h1><p>starting…</p></body></html>"
    rows = "".join(
        f"<tr><td>{_e(c.name)}</td><td>{c.queued_items}</td><td>{format_size(c.queued_bytes)}</td>"
        f"<td>{_age(c.oldest_queued_age_s)}</td><td>{c.committed_items}</td></tr>"
        for c in snap.classes)
    table = ("<table><tr><th>class</th><th>queued</th><th>bytes</th><th>oldest</th>"
             f"<th>delivered</th></tr>{rows}</table>")
    upcoming = "".join(f"<li>{_e(_window_text(w))}</li>" for w in snap.timeline[:6])
    problems = "".join(
        f'<li><span class="{"bad" if p.get("level") == "error" else "warn"}">{_e(p.get("ts"))}'
        f" {_e(p.get('event'))}</span>: {_e(p.get('msg'))}</li>"
        for p in reversed(snap.problems)) or '<li class="muted">none</li>'
    return (
        head
        + f"<h1>skyferry · {_e(snap.site)}</h1>"
        + f'<div class="muted">as of {iso(snap.time)} UTC · refreshes every {REFRESH_S}s · '
        + '<a href="/metrics">metrics</a> · <a href="/status.json">json</a></div>'
        + "<h2>Now</h2>" + _cards(snap)
        + "<h2>Queue by class</h2>" + table
        + "<h2>Windows, next 24 h</h2>" + _timeline(snap)
        + f"<ul>{upcoming or '<li class=muted>none</li>'}</ul>"
        + f"<h2>Last problems</h2><ul>{problems}</ul></body></html>"
    )


def _cards(snap: Snapshot) -> str:
    """The "Now" row: queue, gate and window, link, disk, and MQTT when configured."""
    gate_cls = "ok" if snap.gate_open else ("warn" if snap.paused else "muted")
    nxt = snap.seconds_to_next()
    if snap.window is not None:
        window = ("open now, until " + ("further notice" if snap.window.end is None
                                         else iso(snap.window.end)))
    elif nxt is not None:
        window = f"next in {_age(nxt)} ({iso(snap.next_change or 0)})"
    else:
        window = "none scheduled"
    mqtt = snap.mqtt
    mqtt_card = ""
    if mqtt is not None:
        # With subscriptions the ingest connection matters; otherwise the status one.
        up = mqtt.get("connected") if mqtt.get("ingest") else mqtt.get("status_connected")
        detail = (f"{_e(mqtt.get('pending', 0))} messages pending" if mqtt.get("ingest")
                  else "status and commands")
        mqtt_card = (f'<div class="card">MQTT broker<b class="{"ok" if up else "bad"}">'
                     f"{'connected' if up else 'disconnected'}</b>{detail}</div>")
    quota = (f"{format_size(snap.quota_used)} of {format_size(snap.quota_limit)}"
             if snap.quota_limit else f"{format_size(snap.quota_used)} (no quota)")
    return (
        f'<div class="cards">'
        f'<div class="card">Queue<b>{snap.queued_items} objects</b>'
        f"{format_size(snap.queued_bytes)}</div>"
        f'<div class="card">Gate<b class="{gate_cls}">{_e(snap.gate_state)}</b>'
        f"window: {_e(window)}</div>"
        f'<div class="card">Link<b class="{"ok" if snap.link_up else "bad"}">'
        f"{'up' if snap.link_up else 'down'}</b>"
        f"{format_size(int(snap.throughput_bps))}/s sent</div>"
        f'<div class="card">Disk<b>{_e(quota)}</b>state_dir</div>{mqtt_card}</div>'
    )
