"""Compose the site's :class:`~agent.protocol.Status` from what each module persisted.

Each module keeps its own part of the site's state in the store's key-value table, so that
the daemon, ``edgefleet-agent status`` (a separate process) and the link all see the same
thing, and a restarted agent reports what it knew before the restart:

* ``site.install``     installer: ``bundle``, ``install_state``, ``components``
* ``site.degradation`` degradation: ``state``, ``reason``, ``nodes``, ``scaled_down``
* ``site.snapshot``    snapshots: a :class:`~agent.protocol.SnapshotInfo` as a dict
* ``site.trust``       intake: the effective bundle trust root as last loaded (``version``,
  ``seed_version``, ``rotations``, ``expires``) or why it was refused (``error``)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agent import outbox, protocol
from agent.state import StateStore

INSTALL_KEY = "site.install"
DEGRADATION_KEY = "site.degradation"
SNAPSHOT_KEY = "site.snapshot"
TRUST_KEY = "site.trust"

try:
    from importlib.metadata import version as _dist_version

    AGENT_VERSION = _dist_version("edgefleet")
except Exception:  # pragma: no cover - running from a source tree without metadata
    AGENT_VERSION = "0+unknown"


def parts(store: StateStore) -> dict[str, Any]:
    return {
        "install": store.get(INSTALL_KEY, {}) or {},
        "degradation": store.get(DEGRADATION_KEY, {}) or {},
        "snapshot": store.get(SNAPSHOT_KEY),
    }


def timestamp(value: Any) -> float | None:
    """Unix time of a stored time value (a number, or ISO 8601 text as the modules store it)."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return None


def _fresh_snapshot(value: Any, *, now: datetime) -> Any:
    """Recompute the snapshot age at send time: the stored age is only as fresh as its last write."""
    last = timestamp(value.get("last_success")) if isinstance(value, dict) else None
    if last is None:
        return value
    return {**value, "age_seconds": max(0.0, now.timestamp() - last)}


def build(store: StateStore, *, site: str, interval_seconds: float, seq: int | None = None) -> protocol.Status:
    p = parts(store)
    install, degradation = p["install"], p["degradation"]
    snapshot = _fresh_snapshot(p["snapshot"], now=protocol.now())
    return protocol.Status(
        site=site,
        seq=outbox.next_seq(store) if seq is None else seq,
        state=protocol.SiteState(degradation.get("state", protocol.SiteState.GREEN.value)),
        state_reason=degradation.get("reason", ""),
        bundle=install.get("bundle"),
        install_state=install.get("install_state", "idle"),
        components=install.get("components", []),
        nodes=degradation.get("nodes", []),
        scaled_down=degradation.get("scaled_down", []),
        snapshot=snapshot,
        agent_version=AGENT_VERSION,
        interval_seconds=interval_seconds,
    )
