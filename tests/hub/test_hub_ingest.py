"""Ingest against a real mosquitto into SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from hub_harness import Broker, counter, event, hub_cfg, publish, publisher, status, wait_until

from agent import protocol
from hub import ingest, service
from hub.models import EVENTS, STATUS_HISTORY


def _count(hub: service.Hub, table: sa.Table, **where: str) -> int:
    with hub.ctx.store.engine.connect() as conn:
        stmt = sa.select(sa.func.count()).select_from(table)
        for k, v in where.items():
            stmt = stmt.where(table.c[k] == v)
        return int(conn.execute(stmt).scalar_one())


async def test_valid_messages_are_stored(broker: Broker, db_url: str, tmp_path: Path) -> None:
    cfg = hub_cfg(broker=broker, db_url=db_url, tmp=tmp_path)
    async with service.running(cfg, serve_api=False) as hub:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        async with publisher(broker) as pub:
            await publish(pub, protocol.Online(site="site-a", seq=1, online=True), channel=protocol.Channel.ONLINE)
            for seq in range(2, 7):
                await publish(
                    pub, status("site-a", seq, state="yellow" if seq == 6 else "green"), channel=protocol.Channel.STATUS
                )
            for seq in range(7, 17):
                await publish(pub, event("site-a", seq), channel=protocol.Channel.EVENTS)
            await publish(pub, status("site-b", 1), channel=protocol.Channel.STATUS)

        await wait_until(lambda: _count(hub, EVENTS) == 10 and _count(hub, STATUS_HISTORY) == 6, what="rows")
        site = hub.ctx.store.get_site("site-a")
        assert site is not None
        assert site["state"] == "yellow" and site["status_seq"] == 6 and site["online"] is True
        assert site["stale"] is False
        events = hub.ctx.store.site_events("site-a", limit=100)
        assert [e["seq"] for e in events] == list(range(7, 17))
        total, sites = hub.ctx.store.list_sites()
        assert total == 2 and [s["site"] for s in sites] == ["site-a", "site-b"]
        reg = hub.ctx.metrics.registry
        # The flusher counts a batch when its commit returns to the event loop, a moment after the rows are visible.
        await wait_until(
            lambda: counter(reg, "edgefleet_hub_messages_stored_total", kind="event") >= 10
            and counter(reg, "edgefleet_hub_messages_stored_total", kind="status") >= 6,
            what="stored counters",
        )
        assert counter(reg, "edgefleet_hub_messages_stored_total", kind="event") == 10
        assert counter(reg, "edgefleet_hub_messages_stored_total", kind="status") == 6


async def test_a_backlog_is_read_no_faster_than_commits_allow(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed session with a backlog: the hub holds at most its window of unacknowledged deliveries.

    Mosquitto 2.0 honours the Receive Maximum we send only until the first PUBACKs of a resumed
    session, then sends the whole queue; without our own flow control the hub read all of it into
    memory before committing much (measured in the benchmark: 1.2 GB for a 90,000-message backlog).
    """
    window, backlog = 100, 1500
    peak = [0]
    received = ingest.Connection.received

    def watched(self: ingest.Connection, qos: int) -> None:
        received(self, qos)
        peak[0] = max(peak[0], self.unacked)

    monkeypatch.setattr(ingest.Connection, "received", watched)
    cfg = hub_cfg(broker=broker, db_url=f"sqlite:///{tmp_path / 'hub.db'}", tmp=tmp_path,
                  mqtt={"receive_maximum": window}, ingest={"batch_size": 20})
    async with service.running(cfg, serve_api=False) as hub:  # creates the persistent session
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
    async with publisher(broker) as pub:
        for i in range(backlog):
            await publish(pub, status(f"site-{i % 50}", 1 + i // 50), channel=protocol.Channel.STATUS)
    async with service.running(cfg, serve_api=False) as hub:
        await wait_until(lambda: _count(hub, STATUS_HISTORY) == backlog, timeout=60, what="the backlog stored")
    assert 0 < peak[0] <= window
