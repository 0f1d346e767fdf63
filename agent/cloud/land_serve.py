"""The lander's own page, with `[land] listen = "HOST:PORT"`: the fleet page at /, /fleet.json,
and Prometheus metrics at /metrics (agent/cloud/land_metrics.py), served by aiohttp in the
lander's event loop. The fleet (agent/cloud/fleet.py) is refreshed at every `poll`: the sites'
recent heartbeats then, the older ones and the landing figures at start and every `backfill`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.cloud.fleet import FleetWatch
from agent.cloud.fleet_page import render_html
from agent.cloud.land import Lander
from agent.cloud.land_config import LandSettings
from agent.errors import SkyferryError

log = logging.getLogger("skyferry.land")


class LandView:
    """The fleet watch and the web application that shows it beside the lander's metrics."""

    def __init__(self, lander: Lander, settings: LandSettings, key_dir: Path) -> None:
        self.lander, self.settings = lander, settings
        self.fleet = FleetWatch(lander.backend, lander.dest, lander.recipient, lander.site_keys,
                                key_dir, more_sites=lambda: list(lander.discovery.sites))
        lander.metrics.watch(self.fleet, settings.silent_after_s)
        self.app = web.Application()
        self.app.router.add_get("/", self._page)
        self.app.router.add_get("/fleet.json", self._json)
        self.app.router.add_get("/metrics", self._metrics)

    def data(self) -> dict[str, Any]:
        return self.fleet.to_json(time.time(), self.settings.silent_after_s)

    def lander_figures(self) -> dict[str, Any]:
        m = self.lander.metrics

        def total(counter: Any) -> int:
            return round(sum(float(s.value) for f in counter.collect() for s in f.samples
                             if s.name.endswith("_total")))

        return {"files": total(m.files), "bytes": total(m.bytes),
                "quarantined": total(m.quarantined), "lag_s": m.lag_quantiles()}

    async def _page(self, _request: web.Request) -> web.Response:
        return web.Response(text=render_html(self.data(), self.lander_figures()),
                            content_type="text/html", charset="utf-8")

    async def _json(self, _request: web.Request) -> web.Response:
        return web.json_response({**self.data(), "lander": self.lander_figures()})

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.lander.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def watch(self) -> None:
        """Refresh the fleet at every poll; fully at start and every backfill."""
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while True:
            full = loop.time() >= next_full
            try:
                await self.fleet.refresh(full=full)
                if full:
                    next_full = loop.time() + self.settings.backfill_s
            except Exception as e:  # the page keeps its last picture; landing carries on
                log.warning("fleet refresh failed: %s", e, extra={"event": "fleet_failed"})
            await asyncio.sleep(self.settings.poll_s)


async def land_with_view(lander: Lander, settings: LandSettings, key_dir: Path,
                         work: Coroutine[Any, Any, None]) -> None:
    """Run `work` (the lander) with the fleet watch and the page served beside it."""
    if settings.listen is None:
        await work
        return
    view = LandView(lander, settings, key_dir)
    runner = web.AppRunner(view.app, access_log=None)
    await runner.setup()
    host, port = settings.listen
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        work.close()
        raise SkyferryError(f"[land] listen = \"{host}:{port}\": cannot listen there ({e}); "
                            "choose a free port") from None
    log.info("fleet page at http://%s:%d/", host, port, extra={"event": "land_listen"})
    watch = asyncio.create_task(view.watch(), name="fleet-watch")  # it never raises
    try:
        await work  # its errors stay its own (one line), not wrapped in a group
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        await runner.cleanup()
