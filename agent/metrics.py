"""The agent's Prometheus metrics: one place that names them all (prefix ``edgefleet_agent_``).

They live in prometheus-client's default registry, next to the process collector (RSS, CPU,
open fds) and the link's ``edgefleet_outbox_*`` metrics, and ``/metrics`` serves that registry.

Two kinds:

* **Event counters** (``task_restarts``, ``installs``, ``drift_repairs``, ...) are incremented
  by the module where the thing happens.
* **State gauges** (bundle, install state, component/layer health, site state, snapshot age)
  are derived by :func:`refresh` from what the modules persisted in the store
  (agent/sitestatus.py keys), right before each scrape and on the daemon's status tick. The
  store is the single source of truth, so a gauge can never disagree with
  ``edgefleet-agent status`` or with the status sent to the hub, and modules need not
  remember to keep gauges in step.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

from agent import protocol, sitestatus
from agent.degrade import tracker
from agent.state import StateStore

SITE_STATES = [s.value for s in protocol.SiteState]
_SITE_STATE_CODE = {state: code for code, state in enumerate(SITE_STATES)}

# --- identity
AGENT = Info("edgefleet_agent", "Agent build and site identity")
BUNDLE = Gauge(
    "edgefleet_agent_bundle_info", "The installed bundle (value 1), by name, version and release",
    ["name", "version", "release"],
)
# --- install
INSTALL_STATE = Gauge(
    "edgefleet_agent_install_state", "1 for the installer's current state, by state name", ["state"]
)
INSTALLS = Counter("edgefleet_agent_installs_total", "Bundle installs and upgrades finished, by result", ["result"])
INSTALL_SECONDS = Histogram(
    "edgefleet_agent_install_duration_seconds", "Wall time of bundle installs and upgrades",
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
ROLLBACKS = Counter("edgefleet_agent_rollbacks_total", "Automatic and commanded rollbacks to the last good bundle")
BUNDLES_REJECTED = Counter("edgefleet_agent_bundles_rejected_total", "Bundles refused at intake, by reason", ["reason"])
DRIFT_REPAIRS = Counter("edgefleet_agent_drift_repairs_total", "Platform objects restored by drift repair", ["kind"])
# --- health
COMPONENT_HEALTHY = Gauge(
    "edgefleet_agent_component_healthy", "1 if the component passes its health checks",
    ["component", "layer", "tier"],
)
COMPONENT_DEGRADED = Gauge(
    "edgefleet_agent_component_degraded", "1 if the degradation controller scaled the component down",
    ["component", "layer", "tier"],
)
LAYER_HEALTHY = Gauge("edgefleet_agent_layer_healthy", "1 if every component of the layer is healthy", ["layer"])
COMPONENTS = Gauge("edgefleet_agent_components", "Components known to the installer, by health", ["healthy"])
# --- degradation
SITE_STATE = Gauge("edgefleet_agent_site_state", "1 for the site's current degradation state", ["state"])
SITE_STATE_CODE = Gauge("edgefleet_agent_site_state_code", "Degradation state as a number: 0 green .. 3 black")
SITE_STATE_INFO = Gauge(
    "edgefleet_agent_site_state_info",
    "1 for the current degradation state and why, as a short code: none, node-lost, capacity, control-plane-only, "
    "no-nodes, api-unreachable (unknown: not recorded)",
    ["state", "reason"],
)
NODES = Gauge("edgefleet_agent_nodes", "Cluster nodes, by readiness", ["ready"])
NODE_AVAILABLE = Gauge(
    "edgefleet_agent_node_available",
    "1 if the degradation controller counts the node available, 0 if it counts it lost (what the state is based on)",
    ["node"],
)
SCALED_DOWN = Gauge("edgefleet_agent_scaled_down_workloads", "Workloads currently scaled down by degradation")
TRANSITIONS = Counter(
    "edgefleet_agent_degradation_transitions_total", "Degradation state changes", ["from_state", "to_state"]
)
# --- snapshots
SNAPSHOT_AGE = Gauge("edgefleet_agent_snapshot_age_seconds", "Age of the newest good etcd snapshot (-1: none yet)")
SNAPSHOT_LAST_SUCCESS = Gauge(
    "edgefleet_agent_snapshot_last_success_timestamp_seconds", "Unix time of the newest good etcd snapshot"
)
SNAPSHOT_FAILURES = Gauge("edgefleet_agent_snapshot_consecutive_failures", "Snapshot failures since the last success")
SNAPSHOT_SIZE = Gauge("edgefleet_agent_snapshot_size_bytes", "Size on disk of the newest good etcd snapshot (0: none)")
SNAPSHOTS = Counter("edgefleet_agent_snapshots_total", "Snapshot attempts, by result", ["result"])
# --- link
LINK_CONNECTED = Gauge("edgefleet_agent_link_connected", "1 while the MQTT link to the hub is up")
LAST_PUBLISH = Gauge("edgefleet_agent_last_publish_timestamp_seconds", "Unix time of the last acknowledged publish")
COMMANDS = Counter("edgefleet_agent_commands_total", "Hub commands received, by name and result", ["name", "result"])
# --- daemon
TASK_UP = Gauge("edgefleet_agent_task_up", "1 while the daemon task runs, 0 while it waits to be restarted", ["task"])
TASK_RESTARTS = Counter("edgefleet_agent_task_restarts_total", "Daemon task crashes followed by a restart", ["task"])
KUBE_UP = Gauge("edgefleet_agent_kube_up", "1 if the last API server probe succeeded")
KUBE_LAST_CONTACT_AGE = Gauge(
    "edgefleet_agent_kube_last_contact_age_seconds", "Seconds since the API server last answered (-1: never)"
)
LOOP_LAG = Gauge("edgefleet_agent_event_loop_lag_seconds", "How late the daemon's heartbeat woke up (event-loop lag)")
STARTED = Gauge("edgefleet_agent_start_timestamp_seconds", "Unix time the daemon started")


def refresh(store: StateStore, *, now: float | None = None) -> None:
    """Set the state gauges from the persisted site state (see the module docstring)."""
    now = time.time() if now is None else now
    parts = sitestatus.parts(store)
    install, degradation, snapshot = parts["install"], parts["degradation"], parts["snapshot"]

    BUNDLE.clear()
    bundle = install.get("bundle")
    if isinstance(bundle, dict) and bundle.get("name"):
        BUNDLE.labels(str(bundle["name"]), str(bundle.get("version", "")), str(bundle.get("release", ""))).set(1)
    INSTALL_STATE.clear()
    INSTALL_STATE.labels(str(install.get("install_state", "idle"))).set(1)

    COMPONENT_HEALTHY.clear()
    COMPONENT_DEGRADED.clear()
    LAYER_HEALTHY.clear()
    layers: dict[str, bool] = {}
    counts = {"true": 0, "false": 0}
    for comp in install.get("components") or []:
        if not isinstance(comp, dict) or "name" not in comp:
            continue
        labels = (str(comp["name"]), str(comp.get("layer", "")), str(comp.get("tier", "")))
        healthy = bool(comp.get("healthy"))
        COMPONENT_HEALTHY.labels(*labels).set(1 if healthy else 0)
        COMPONENT_DEGRADED.labels(*labels).set(1 if comp.get("degraded") else 0)
        layers[labels[1]] = layers.get(labels[1], True) and healthy
        counts["true" if healthy else "false"] += 1
    for layer, healthy in layers.items():
        LAYER_HEALTHY.labels(layer).set(1 if healthy else 0)
    for key, count in counts.items():
        COMPONENTS.labels(key).set(count)

    state = str(degradation.get("state", protocol.SiteState.GREEN.value))
    for name in SITE_STATES:
        SITE_STATE.labels(name).set(1 if name == state else 0)
    SITE_STATE_CODE.set(_SITE_STATE_CODE.get(state, -1))
    SITE_STATE_INFO.clear()
    SITE_STATE_INFO.labels(state if state in _SITE_STATE_CODE else "unknown", cause_label(degradation)).set(1)
    nodes = [n for n in degradation.get("nodes") or [] if isinstance(n, dict)]
    NODE_AVAILABLE.clear()
    for n in nodes:
        if n.get("name"):
            NODE_AVAILABLE.labels(str(n["name"])).set(1 if n.get("ready") else 0)
    NODES.labels("true").set(sum(1 for n in nodes if n.get("ready")))
    NODES.labels("false").set(sum(1 for n in nodes if not n.get("ready")))
    SCALED_DOWN.set(len(degradation.get("scaled_down") or []))

    last = sitestatus.timestamp((snapshot or {}).get("last_success"))
    SNAPSHOT_AGE.set(now - last if last is not None else -1)
    SNAPSHOT_LAST_SUCCESS.set(last or 0)
    SNAPSHOT_FAILURES.set(int((snapshot or {}).get("failures") or 0))
    SNAPSHOT_SIZE.set(int((snapshot or {}).get("size_bytes") or 0))


def cause_label(degradation: dict[str, Any]) -> str:
    """The ``reason`` label: the controller's cause code, ``unknown`` for anything outside the fixed set.

    Mapping unexpected values (a state written by an older or newer agent) to ``unknown``
    keeps the label's cardinality bounded whatever the store holds; the words are in
    ``edgefleet-agent status`` and the transition events. A site that never degraded has no
    degradation record yet and reads as ``none``.
    """
    if not degradation:
        return tracker.CAUSE_NONE
    cause = degradation.get("cause")
    return cause if isinstance(cause, str) and cause in tracker.CAUSES else tracker.CAUSE_UNKNOWN
