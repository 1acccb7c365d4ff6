"""Agent events: every state transition or result worth telling the hub about.

An event is logged *and* written to the outbox in one step, so it reaches the hub whenever
a link exists, however long after. Callers never talk to MQTT directly.
"""

from __future__ import annotations

from typing import Any

import structlog

from agent import outbox, protocol
from agent.state import StateStore

log = structlog.get_logger("edgefleet.events")


def emit(
    store: StateStore,
    *,
    site: str,
    type: str,
    summary: str,
    severity: protocol.Severity = protocol.Severity.INFO,
    data: dict[str, Any] | None = None,
) -> protocol.Event:
    with store.transaction():  # sequence number and row land together or not at all
        event = protocol.Event(
            site=site, seq=outbox.next_seq(store), type=type, summary=summary, severity=severity, data=data or {}
        )
        outbox.enqueue(store, event, channel=protocol.Channel.EVENTS)
    log_method = {"info": log.info, "warning": log.warning, "error": log.error}[severity.value]
    log_method(summary, event_type=type, msg_id=event.msg_id, seq=event.seq, **(data or {}))
    return event
