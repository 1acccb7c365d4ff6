"""What the rest of the agent (and the hub) sees of snapshots: kv ``site.snapshot`` + counters.

Both the daemon and ``edgefleet-agent snapshot now`` (another process) update these, so the
state lives in the store, never in memory. ``age_seconds`` is a snapshot of a moving value:
the task refreshes it about once a minute, and consumers that can should prefer
``last_success`` (an absolute time) when computing age themselves.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agent import protocol, sitestatus
from agent.config import SnapshotConfig
from agent.snapshots import catalog, schedule
from agent.state import StateStore

FAILURES_KEY = "snapshots.failures"


def failures(store: StateStore) -> dict[str, Any]:
    """``consecutive`` (since the last success), ``total``, ``last_error``, ``last_attempt``."""
    value = store.get(FAILURES_KEY, None) or {}
    return {
        "consecutive": int(value.get("consecutive", 0)),
        "total": int(value.get("total", 0)),
        "last_error": value.get("last_error"),
        "last_attempt": value.get("last_attempt"),
    }


def record_failure(store: StateStore, *, reason: str, at: datetime) -> int:
    """Count a failed or refused attempt; return the consecutive count."""
    with store.transaction():
        current = failures(store)
        current["consecutive"] += 1
        current["total"] += 1
        current["last_error"] = reason
        current["last_attempt"] = at.isoformat()
        store.put(FAILURES_KEY, current)
    return int(current["consecutive"])


def record_success(store: StateStore, *, at: datetime) -> None:
    with store.transaction():
        current = failures(store)
        current["consecutive"] = 0
        current["last_attempt"] = at.isoformat()
        store.put(FAILURES_KEY, current)


def info(store: StateStore, config: SnapshotConfig, *, now: datetime) -> protocol.SnapshotInfo:
    newest = catalog.newest_verified(store)
    cron = schedule.trigger(config.schedule, timezone=config.timezone)
    return protocol.SnapshotInfo(
        last_success=newest.taken if newest else None,
        age_seconds=max(0.0, (now - newest.taken).total_seconds()) if newest else None,
        size_bytes=newest.file_size if newest else None,
        revision=newest.revision if newest else None,
        schedule=config.schedule if config.timezone == "UTC" else f"{config.schedule} ({config.timezone})",
        max_age_seconds=schedule.max_age(cron, now=now).total_seconds(),
        failures=failures(store)["consecutive"],
    )


def publish(store: StateStore, config: SnapshotConfig, *, now: datetime | None = None) -> protocol.SnapshotInfo:
    value = info(store, config, now=now or datetime.now(UTC))
    store.put(sitestatus.SNAPSHOT_KEY, value.model_dump(mode="json"))
    return value
