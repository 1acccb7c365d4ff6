"""Prometheus metrics of one hub instance (served on ``/metrics`` by the API).

Each :class:`Metrics` has its own registry, so several hubs can live in one process (tests) and
nothing leaks into the global default registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def _registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=_registry)

    def __post_init__(self) -> None:
        r = self.registry
        self.received = Counter(
            "edgefleet_hub_messages_received", "MQTT messages received, by channel.", ["channel"], registry=r
        )
        self.stored = Counter(
            "edgefleet_hub_messages_stored", "Messages newly written to the store, by kind.", ["kind"], registry=r
        )
        self.duplicates = Counter(
            "edgefleet_hub_messages_duplicate", "Redelivered messages dropped by dedupe, by kind.", ["kind"], registry=r
        )
        self.rejected = Counter(
            "edgefleet_hub_messages_rejected",
            "Refused messages by reason (topic, oversized, malformed, schema, spoofed).",
            ["reason"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "edgefleet_hub_ingest_batch_seconds",
            "Time to write one ingest batch.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.latency = Histogram(
            "edgefleet_hub_ingest_latency_seconds",
            "Site timestamp to stored, for status messages (includes site clock skew).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.db_errors = Counter(
            "edgefleet_hub_db_errors", "Failed batch writes (retried; nothing acknowledged).", registry=r
        )
        self.connected = Gauge("edgefleet_hub_mqtt_connected", "1 while connected to the broker.", registry=r)
        self.pending = Gauge("edgefleet_hub_ingest_pending", "Messages received but not yet committed.", registry=r)
        self.stale_sites = Gauge("edgefleet_hub_sites_stale", "Sites currently marked stale.", registry=r)
        self.commands = Counter(
            "edgefleet_hub_commands", "Commands issued, by name and outcome.", ["name", "outcome"], registry=r
        )
