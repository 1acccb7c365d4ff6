"""The edgefleet hub: fleet ingest over MQTT, fleet store, REST API, dashboard and signed commands."""
