"""Prometheus metrics, on a registry of our own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ingested_bytes = Counter("skyferry_ingested_bytes", "Plaintext bytes accepted",
                                      ["class"], registry=r)
        self.ingested_objects = Counter("skyferry_ingested_objects", "Objects accepted",
                                        ["class"], registry=r)
        self.stored_bytes = Counter("skyferry_stored_bytes", "Sealed bytes written to the store",
                                    ["class"], registry=r)
        self.sent_bytes = Counter("skyferry_sent_bytes", "Sealed bytes acknowledged by the cloud",
                                  ["kind"], registry=r)
        self.resent_bytes = Counter("skyferry_resent_bytes",
                                    "Bytes of uploads that were cut and must be re-sent",
                                    registry=r)
        self.committed_objects = Counter("skyferry_committed_objects",
                                         "Objects whose manifest the cloud acknowledged",
                                         ["class"], registry=r)
        self.dedup_chunks = Counter("skyferry_dedup_chunks", "Chunks not stored again (dedup)",
                                    registry=r)
        self.refusals = Counter("skyferry_quota_refusals",
                                "Ingests refused because the quota is full", ["class"],
                                registry=r)
        self.evictions = Counter("skyferry_evictions", "Objects dropped (quota or TTL)",
                                 ["class", "reason"], registry=r)
        self.errors = Counter("skyferry_errors", "Errors by kind", ["kind"], registry=r)
        self.gate_open = Gauge("skyferry_gate_open", "1 when uploads may run", registry=r)
        self.quota_used = Gauge("skyferry_quota_used_bytes", "Bytes used in state_dir",
                                registry=r)
