"""At-least-once delivery, stored exactly once: duplicates, broker restarts, a hub killed mid-batch."""

from __future__ import annotations

import signal
from pathlib import Path

import sqlalchemy as sa
from hub_harness import (
    Broker,
    HubProcess,
    counter,
    event,
    hub_cfg,
    hub_process_config,
    publish,
    publisher,
    status,
    wait_until,
)

from agent import protocol
from hub import service
from hub.models import EVENTS, STATUS_HISTORY
from hub.store import open_store


def _event_seqs(url: str, site: str) -> list[int]:
    store = open_store(url, migrate=False)
    try:
        with store.engine.connect() as conn:
            return list(
                conn.execute(sa.select(EVENTS.c.seq).where(EVENTS.c.site == site).order_by(EVENTS.c.id)).scalars()
            )
    finally:
        store.close()


async def test_duplicate_delivery_is_stored_once(broker: Broker, db_url: str, tmp_path: Path) -> None:
    cfg = hub_cfg(broker=broker, db_url=db_url, tmp=tmp_path, mqtt={"shared_subscriptions": False})
    async with service.running(cfg, serve_api=False) as hub:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        reg = hub.ctx.metrics.registry
        ev = event("site-a", 1)
        st = status("site-a", 2)
        async with publisher(broker) as pub:
            for _ in range(3):
                await publish(pub, ev, channel=protocol.Channel.EVENTS)
                await publish(pub, st, channel=protocol.Channel.STATUS)
        await wait_until(
            lambda: (
                counter(reg, "edgefleet_hub_messages_duplicate_total", kind="event") == 2
                and counter(reg, "edgefleet_hub_messages_duplicate_total", kind="status") == 2
            ),
            what="duplicates counted",
        )
        # A fresh process (empty LRU) meeting old messages again: the unique constraints catch them.
        hub.ingest.dedupe.ids.clear()
        async with publisher(broker) as pub:
            await publish(pub, ev, channel=protocol.Channel.EVENTS)
            await publish(pub, st, channel=protocol.Channel.STATUS)
        await wait_until(
            lambda: counter(reg, "edgefleet_hub_messages_duplicate_total", kind="event") == 3, what="db dedupe"
        )
        await wait_until(
            lambda: counter(reg, "edgefleet_hub_messages_duplicate_total", kind="status") == 3, what="db dedupe"
        )
        with hub.ctx.store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(EVENTS)).scalar_one() == 1
            assert conn.execute(sa.select(sa.func.count()).select_from(STATUS_HISTORY)).scalar_one() == 1
        assert counter(reg, "edgefleet_hub_messages_stored_total", kind="event") == 1


async def test_broker_restart_and_republish(broker: Broker, db_url: str, tmp_path: Path) -> None:
    cfg = hub_cfg(broker=broker, db_url=db_url, tmp=tmp_path, mqtt={"reconnect_max_seconds": 0.5})
    events = [event("site-a", seq) for seq in range(1, 101)]
    async with service.running(cfg, serve_api=False) as hub:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        async with publisher(broker) as pub:
            for ev in events[:50]:
                await publish(pub, ev, channel=protocol.Channel.EVENTS)
        broker.stop(signal.SIGKILL)  # no clean shutdown of the broker either
        await wait_until(lambda: not hub.ingest.subscribed.is_set(), what="hub noticed")
        broker.start()
        # (A broker that lost its state drops what is published before the hub subscribes again,
        # with a PUBACK; broker persistence is what covers that window, see docs/hub.md.)
        await wait_until(hub.ingest.subscribed.is_set, timeout=20, what="hub resubscribed")
        # A publisher that never saw its PUBACKs sends everything again, plus the rest.
        async with publisher(broker) as pub:
            for ev in events:
                await publish(pub, ev, channel=protocol.Channel.EVENTS)
        await wait_until(lambda: len(hub.ctx.store.site_events("site-a", limit=1000)) >= 100, timeout=30, what="all")
    assert _event_seqs(db_url, "site-a") == list(range(1, 101))


async def test_hub_killed_before_commit_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    """Messages are acknowledged only after commit: a SIGKILLed hub gets them again on restart."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    slow = hub_process_config(
        broker=broker,
        db_url=url,
        client_id="hub-crash-1",
        ingest={"flush_interval_seconds": 3600, "batch_size": 100000},
    )
    hub = HubProcess(workdir=tmp_path / "hub", config=slow)
    hub.start()
    try:
        await hub.wait_ready()
        async with publisher(broker) as pub:
            for seq in range(1, 21):
                await publish(pub, event("site-a", seq), channel=protocol.Channel.EVENTS)
        await wait_until(lambda: hub.metric("edgefleet_hub_ingest_pending"), what="held in memory")
        assert await hub.metric("edgefleet_hub_ingest_pending") == 20
        hub.kill(signal.SIGKILL)
        assert _event_seqs(url, "site-a") == []
        # Same client id: the broker still holds the 20 unacknowledged messages for this session.
        hub.config["ingest"] = {"flush_interval_seconds": 0.05}
        hub.start()
        await hub.wait_ready()
        await wait_until(lambda: len(_event_seqs(url, "site-a")) >= 20, timeout=30, what="redelivered")
        assert _event_seqs(url, "site-a") == list(range(1, 21))
    finally:
        hub.kill()
