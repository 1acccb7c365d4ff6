"""What every agent task gets: config, the state store, and the way to tell the hub things."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from agent import events, protocol
from agent.config import AgentConfig
from agent.state import StateStore


@dataclass
class AgentContext:
    config: AgentConfig
    store: StateStore
    #: Set to make the link publish a fresh status right away (state changes, report-now).
    report_now: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set to make the snapshot task take an on-demand snapshot.
    snapshot_now: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set while the site is Red: non-critical work (telemetry rate, deferred jobs) backs off.
    limp_home: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def site(self) -> str:
        return self.config.site_id

    def emit(
        self,
        type: str,
        summary: str,
        *,
        severity: protocol.Severity = protocol.Severity.INFO,
        data: dict[str, Any] | None = None,
    ) -> protocol.Event:
        return events.emit(self.store, site=self.site, type=type, summary=summary, severity=severity, data=data)
