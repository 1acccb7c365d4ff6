"""Agent events: every state transition or result worth telling the hub about.

An event is logged *and* written to the outbox in one step, so it reaches the hub whenever
a link exists, however long after. Callers never talk to MQTT directly.

A copy also goes to a small local history (the newest :data:`HISTORY` events), because the
outbox forgets an event once the broker acknowledged it, while the operator standing at the
node (``edgefleet-agent status``) still wants to see what happened recently.
"""

from __future__ import annotations

import weakref
from typing import Any

import structlog

from agent import outbox, protocol
from agent.state import StateStore

log = structlog.get_logger("edgefleet.events")

HISTORY = 200
MIGRATIONS = [
    """CREATE TABLE event_log (
        seq INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        type TEXT NOT NULL,
        severity TEXT NOT NULL,
        summary TEXT NOT NULL
    )""",
]
_ready: weakref.WeakSet[StateStore] = weakref.WeakSet()


def setup(store: StateStore) -> None:
    store.migrate("events", MIGRATIONS)
    _ready.add(store)


def recent(store: StateStore, *, limit: int = 20) -> list[dict[str, Any]]:
    """The newest events, newest first, whether or not the hub has them yet."""
    rows = store.db.execute(
        "SELECT seq, ts, type, severity, summary FROM event_log ORDER BY seq DESC LIMIT ?", (limit,)
    ).fetchall()
    return [dict(r) for r in rows]


def emit(
    store: StateStore,
    *,
    site: str,
    type: str,
    summary: str,
    severity: protocol.Severity = protocol.Severity.INFO,
    data: dict[str, Any] | None = None,
) -> protocol.Event:
    if store not in _ready:
        setup(store)
    with store.transaction() as db:  # sequence number, outbox row and history land together or not at all
        event = protocol.Event(
            site=site, seq=outbox.next_seq(store), type=type, summary=summary, severity=severity, data=data or {}
        )
        outbox.enqueue(store, event, channel=protocol.Channel.EVENTS)
        db.execute(
            "INSERT OR REPLACE INTO event_log(seq, ts, type, severity, summary) VALUES(?, ?, ?, ?, ?)",
            (event.seq, event.ts.isoformat(), event.type, event.severity.value, event.summary),
        )
        db.execute("DELETE FROM event_log WHERE seq <= ?", (event.seq - HISTORY,))
    log_method = {"info": log.info, "warning": log.warning, "error": log.error}[severity.value]
    log_method(summary, event_type=type, msg_id=event.msg_id, seq=event.seq, **(data or {}))
    return event
