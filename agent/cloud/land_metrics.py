"""The lander's Prometheus metrics, on a registry of its own: what it landed per site, the lag
from a manifest's upload to its files landed, what it quarantined, and the fleet as the sites'
heartbeats describe it (agent/cloud/fleet.py). Served by agent/cloud/land_serve.py.

The lag runs from the manifest's Last-Modified in the sealed store (the service's clock) to the
moment its landing record was written (the lander's clock): a skew between the two shows in it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence, Sized
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.backends.protocol import ObjectInfo
from agent.cloud.fleet import FleetWatch

LAG_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
               600.0, 1800.0, 3600.0, 4 * 3600.0, 86400.0, math.inf)
RECENT_LAGS = 1000  # the p50/p99 gauges describe the last this many manifests landed
QUANTILES = (0.5, 0.99)


class Counts(Protocol):
    """What a landing pass counts (agent/cloud/land.py `LandReport`)."""

    @property
    def files(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    @property
    def quarantined(self) -> Sized: ...


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class LandMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.files = Counter("skyferry_land_files", "Files landed", ["site"], registry=r)
        self.bytes = Counter("skyferry_land_bytes", "Bytes of files landed", ["site"],
                             registry=r)
        self.manifests = Counter("skyferry_land_manifests",
                                 "Manifests whose files were landed", ["site"], registry=r)
        self.quarantined = Counter("skyferry_land_quarantined",
                                   "Sealed objects (or files of them) quarantined", ["site"],
                                   registry=r)
        self.lag = Histogram("skyferry_land_lag_seconds",
                             "From a manifest's upload (Last-Modified) to its files landed",
                             buckets=LAG_BUCKETS, registry=r)
        self.recent: deque[float] = deque(maxlen=RECENT_LAGS)
        r.register(_RecentLag(self.recent))

    def landed(self, info: ObjectInfo, counts: Counts) -> None:
        """One sealed manifest done: what it landed and quarantined (its own counts)."""
        site = info.key.split("/", 1)[0]
        if counts.files:
            self.files.labels(site).inc(counts.files)
            self.bytes.labels(site).inc(counts.bytes)
            self.manifests.labels(site).inc()
            if info.last_modified is not None:
                lag = max(0.0, time.time() - info.last_modified)
                self.lag.observe(lag)
                self.recent.append(lag)
        if len(counts.quarantined):
            self.quarantined.labels(site).inc(len(counts.quarantined))

    def lag_quantiles(self) -> dict[str, float | None]:
        values = list(self.recent)
        return {f"p{round(q * 100)}": quantile(values, q) if values else None
                for q in QUANTILES}

    def watch(self, fleet: FleetWatch, silent_after_s: float) -> None:
        """Export the fleet's heartbeats with every scrape."""
        self.registry.register(_FleetCollector(fleet, silent_after_s))


class _RecentLag(Collector):
    def __init__(self, recent: deque[float]) -> None:
        self.recent = recent

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("skyferry_land_lag_recent_seconds",
                              f"Lag quantiles over the last {RECENT_LAGS} manifests landed",
                              labels=["quantile"])
        values = list(self.recent)
        if values:
            for q in QUANTILES:
                g.add_metric([str(q)], quantile(values, q))
        yield g


class _FleetCollector(Collector):
    def __init__(self, fleet: FleetWatch, silent_after_s: float) -> None:
        self.fleet, self.silent_after_s = fleet, silent_after_s

    def collect(self) -> Iterator[Metric]:
        now = time.time()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("site",)
                  ) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"skyferry_fleet_{name}", doc, labels=list(labels))

        contact = gauge("last_contact_timestamp_seconds", "Creation time of the newest "
                        "trusted heartbeat")
        age = gauge("last_contact_age_seconds", "Age of the newest trusted heartbeat")
        silent = gauge("silent", "1 when a site is silent or has never been heard from")
        trusted = gauge("heartbeat_trusted", "0 when a newer heartbeat did not verify")
        backlog = gauge("backlog_bytes", "Queued bytes at the site", ("site", "class"))
        objects = gauge("backlog_objects", "Queued objects at the site", ("site", "class"))
        oldest = gauge("oldest_queued_age_seconds", "Oldest queued object at the site")
        disk = gauge("disk_free_bytes", "Free disk under the site's state_dir")
        errors = gauge("errors", "Errors the site counted before its last heartbeat")
        hits = gauge("forecast_hit_ratio", "The site's forecast hit ratio")
        info = gauge("info", "The site's software version", ("site", "version"))
        for view in list(self.fleet.sites.values()):
            s = view.site
            silent.add_metric([s], 0 if view.status(now, self.silent_after_s) == "ok" else 1)
            trusted.add_metric([s], 0 if view.untrusted else 1)
            hb = view.heartbeat
            if hb is None:
                continue
            contact.add_metric([s], hb.created_at.timestamp())
            age.add_metric([s], max(0.0, now - hb.created_at.timestamp()))
            for name, q in hb.queue.items():
                backlog.add_metric([s, name], q.bytes)
                objects.add_metric([s, name], q.objects)
            if hb.oldest_queued_age_s is not None:
                oldest.add_metric([s], hb.oldest_queued_age_s)
            disk.add_metric([s], hb.disk_free_bytes)
            errors.add_metric([s], hb.errors)
            if hb.forecast.hit_ratio is not None:
                hits.add_metric([s], hb.forecast.hit_ratio)
            info.add_metric([s, hb.software], 1)
        yield from (contact, age, silent, trusted, backlog, objects, oldest, disk, errors,
                    hits, info)
