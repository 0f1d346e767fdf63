"""Prometheus metrics, on a registry of our own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    """Every series the daemon exports, declared in groups by who sets them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._declare_flow(self.registry)
        self._declare_service_view(self.registry)
        self._declare_mqtt(self.registry)
        self._declare_windows(self.registry)

    def _declare_flow(self, r: CollectorRegistry) -> None:
        """Counted as data moves: ingest, store, uplink, gate, compression."""
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
        self.spool_skipped = Counter(
            "skyferry_spool_skipped",
            "Spool entries passed over or kept in place (once per path and reason)",
            ["source", "reason"], registry=r)
        self.gate_open = Gauge("skyferry_gate_open", "1 when uploads may run", registry=r)
        self.backend_state = Gauge(
            "skyferry_backend_state",
            "1 for the backend's state at its last check (unknown, ok, refused, unreachable)",
            ["state"], registry=r)
        self.compression_level = Gauge("skyferry_compression_level",
                                       "zstd level new chunks are sealed with", registry=r)
        self.compression_long_distance = Gauge(
            "skyferry_compression_long_distance",
            "1 while zstd long-distance matching is on", registry=r)
        self.quota_used = Gauge("skyferry_quota_used_bytes", "Bytes used in state_dir",
                                registry=r)

    def _declare_service_view(self, r: CollectorRegistry) -> None:
        """Set from telemetry snapshots every second, and operator commands."""
        self.quota_limit = Gauge("skyferry_quota_limit_bytes",
                                 "Configured state_dir quota (0: none)", registry=r)
        self.queue_items = Gauge("skyferry_queue_items", "Objects by class and state",
                                 ["class", "state"], registry=r)
        self.queue_bytes = Gauge("skyferry_queue_bytes", "Object bytes by class and state",
                                 ["class", "state"], registry=r)
        self.oldest_age = Gauge("skyferry_oldest_queued_age_seconds",
                                "Age of the oldest queued object, by class", ["class"],
                                registry=r)
        self.compression_saved = Gauge("skyferry_compression_saved_bytes",
                                       "Plaintext minus sealed bytes of every chunk stored",
                                       registry=r)
        self.dedup_saved = Gauge("skyferry_dedup_saved_bytes",
                                 "Object bytes not stored again because a chunk was known",
                                 registry=r)
        self.window_open = Gauge("skyferry_window_open", "1 while a contact window is open",
                                 registry=r)
        self.next_window = Gauge("skyferry_seconds_to_next_window",
                                 "Seconds until the window state next changes (-1: never)",
                                 registry=r)
        self.link_up = Gauge("skyferry_link_up", "1 when the link to the backend answers",
                             registry=r)
        self.link_rtt = Gauge("skyferry_link_rtt_seconds", "Round-trip time of the last probe",
                              registry=r)
        self.throughput = Gauge("skyferry_uplink_throughput_bytes_per_second",
                                "Sealed bytes acknowledged per second, last 10 s", registry=r)
        self.gate_budget = Gauge("skyferry_gate_budget_bytes",
                                 "Bytes the open window can still carry (-1: unknown)",
                                 registry=r)
        self.forecast_hit_rate = Gauge("skyferry_forecast_hit_ratio",
                                       "Share of predicted windows the link confirmed",
                                       registry=r)
        self.paused = Gauge("skyferry_paused", "1 while paused by an operator command",
                            registry=r)
        self.commands = Counter("skyferry_commands", "Operator commands over MQTT",
                                ["command", "result"], registry=r)
        self.commands_refused = Counter("skyferry_commands_refused",
                                        "Commands over MQTT refused (unsigned, bad signature, "
                                        "stale, replay...)", ["reason"], registry=r)

    def _declare_mqtt(self, r: CollectorRegistry) -> None:
        """The MQTT source (agent/sources/mqtt.py)."""
        self.mqtt_refused = Counter("skyferry_mqtt_refused",
                                    "MQTT messages refused (larger than max_message_size)",
                                    ["reason"], registry=r)
        self.mqtt_connected = Gauge("skyferry_mqtt_connected", "1 while connected to the broker",
                                    registry=r)
        self.mqtt_reconnects = Counter("skyferry_mqtt_reconnects",
                                       "Connections to the broker lost", registry=r)
        self.mqtt_messages = Counter("skyferry_mqtt_messages", "MQTT messages received",
                                     ["class"], registry=r)
        self.mqtt_batches = Counter("skyferry_mqtt_batches",
                                    "MQTT batches made durable (one object each)", ["class"],
                                    registry=r)
        self.mqtt_acked = Counter("skyferry_mqtt_acked",
                                  "MQTT messages acknowledged after they were durable",
                                  registry=r)
        self.mqtt_pending = Gauge("skyferry_mqtt_pending_messages",
                                  "MQTT messages received and not yet durable", registry=r)

    def _declare_windows(self, r: CollectorRegistry) -> None:
        """Set by agent/windows/tle.py."""
        self.tle_age_days = Gauge("skyferry_tle_age_days",
                                  "Age of the oldest orbital elements in use", registry=r)
        self.tle_stale = Gauge("skyferry_tle_stale_satellites",
                               "Satellites whose elements are older than stale_after",
                               registry=r)
