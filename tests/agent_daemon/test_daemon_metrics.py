"""State gauges derive from the persisted site state, so /metrics agrees with `status` and the hub."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from daemon_helpers import write_config
from prometheus_client import REGISTRY

from agent import config as agent_config
from agent import daemon, metrics, sitestatus
from agent.context import AgentContext
from agent.state import StateStore


def _value(name: str, labels: dict[str, str] | None = None) -> float | None:
    return REGISTRY.get_sample_value(name, labels or {})


def test_refresh_from_store_and_status_line(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "state")
    try:
        store.put(
            sitestatus.INSTALL_KEY,
            {
                "bundle": {"name": "idp", "version": "2.0.0", "release": 9},
                "install_state": "applying",
                "components": [
                    {"name": "cilium", "layer": 0, "tier": 1, "healthy": True},
                    {"name": "vault", "layer": 0, "tier": 1, "healthy": False},
                    {"name": "grafana", "layer": 3, "tier": 4, "healthy": True, "degraded": True},
                ],
            },
        )
        store.put(
            sitestatus.DEGRADATION_KEY,
            {"state": "red", "nodes": [{"name": "a", "ready": True}, {"name": "b", "ready": False}],
             "scaled_down": [{"kind": "Deployment"}, {"kind": "StatefulSet"}]},
        )
        taken = datetime.now(UTC) - timedelta(minutes=30)
        store.put(sitestatus.SNAPSHOT_KEY, {"last_success": taken.isoformat(), "failures": 2})
        metrics.refresh(store, now=taken.timestamp() + 1800)

        assert _value("edgefleet_agent_bundle_info", {"name": "idp", "version": "2.0.0", "release": "9"}) == 1
        assert _value("edgefleet_agent_install_state", {"state": "applying"}) == 1
        assert _value("edgefleet_agent_component_healthy", {"component": "vault", "layer": "0", "tier": "1"}) == 0
        assert _value("edgefleet_agent_component_degraded", {"component": "grafana", "layer": "3", "tier": "4"}) == 1
        assert _value("edgefleet_agent_layer_healthy", {"layer": "0"}) == 0
        assert _value("edgefleet_agent_layer_healthy", {"layer": "3"}) == 1
        assert _value("edgefleet_agent_site_state", {"state": "red"}) == 1
        assert _value("edgefleet_agent_site_state", {"state": "green"}) == 0
        assert _value("edgefleet_agent_site_state_code") == 2
        assert _value("edgefleet_agent_nodes", {"ready": "false"}) == 1
        assert _value("edgefleet_agent_scaled_down_workloads") == 2
        assert abs((_value("edgefleet_agent_snapshot_age_seconds") or 0) - 1800) < 1
        assert _value("edgefleet_agent_snapshot_consecutive_failures") == 2

        # A new bundle replaces the old series instead of adding one beside it.
        store.put(sitestatus.INSTALL_KEY, {"bundle": {"name": "idp", "version": "2.1.0", "release": 10}})
        metrics.refresh(store)
        assert _value("edgefleet_agent_bundle_info", {"name": "idp", "version": "2.0.0", "release": "9"}) is None
        assert _value("edgefleet_agent_component_healthy", {"component": "vault", "layer": "0", "tier": "1"}) is None
        assert _value("edgefleet_agent_install_state", {"state": "idle"}) == 1

        config = agent_config.load(write_config(tmp_path))
        runtime = daemon.Runtime(ctx=AgentContext(config=config, store=store))
        runtime.tasks["a"] = daemon.TaskState("a", up=True)
        runtime.tasks["b"] = daemon.TaskState("b", up=False)
        line = daemon.summary(runtime)
        assert line.startswith("site site-test red; idp 2.1.0 (idle); 0/0 components healthy; tasks 1/2")
        assert "\n" not in line
    finally:
        store.close()


def test_empty_store_gives_sane_defaults(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "state")
    try:
        metrics.refresh(store, now=time.time())
        assert _value("edgefleet_agent_site_state", {"state": "green"}) == 1
        assert _value("edgefleet_agent_snapshot_age_seconds") == -1
        assert _value("edgefleet_agent_install_state", {"state": "idle"}) == 1
    finally:
        store.close()
