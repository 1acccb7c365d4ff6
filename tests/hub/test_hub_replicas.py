"""Two hub replicas on PostgreSQL behind one MQTT shared subscription."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
import sqlalchemy as sa
from hub_harness import Broker, HubProcess, event, hub_process_config, publish, publisher, status, wait_until

from agent import protocol
from hub.models import EVENTS, STATUS_HISTORY
from hub.store import open_store

SITES = [f"site-{i:02d}" for i in range(20)]


def _counts(url: str) -> tuple[int, int, int]:
    store = open_store(url, migrate=False)
    try:
        with store.engine.connect() as conn:
            events = conn.execute(sa.select(sa.func.count()).select_from(EVENTS)).scalar_one()
            distinct = conn.execute(sa.select(sa.func.count(sa.distinct(EVENTS.c.msg_id)))).scalar_one()
            history = conn.execute(sa.select(sa.func.count()).select_from(STATUS_HISTORY)).scalar_one()
            return int(events), int(distinct), int(history)
    finally:
        store.close()


def _seqs(url: str, site: str) -> list[int]:
    store = open_store(url, migrate=False)
    try:
        with store.engine.connect() as conn:
            return list(
                conn.execute(sa.select(EVENTS.c.seq).where(EVENTS.c.site == site).order_by(EVENTS.c.seq)).scalars()
            )
    finally:
        store.close()


async def _burst(broker: Broker, start: int, end: int) -> None:
    async with publisher(broker) as pub:
        for seq in range(start, end):
            for site in SITES:
                await publish(pub, event(site, seq), channel=protocol.Channel.EVENTS)
                if seq % 10 == 0:
                    await publish(pub, status(site, seq), channel=protocol.Channel.STATUS)


@pytest.mark.slow
async def test_two_replicas_store_once_and_survive_a_kill(broker: Broker, pg_url: str, tmp_path: Path) -> None:
    replicas = [
        HubProcess(
            workdir=tmp_path / name,
            config=hub_process_config(
                broker=broker,
                db_url=pg_url,
                client_id=name,
                replica_takeover_seconds=3,
                mqtt={"shared_subscriptions": True},
            ),
        )
        for name in ("hub-r1", "hub-r2")
    ]
    for r in replicas:
        r.start()
    try:
        await asyncio.gather(*(r.wait_ready() for r in replicas))
        await _burst(broker, 1, 51)  # 20 sites x 50 events, 100 statuses
        await wait_until(lambda: _counts(pg_url)[0] == 1000, timeout=60, what="first burst stored")
        shares = [await r.metric("edgefleet_hub_messages_stored_total", kind="event") for r in replicas]
        assert sum(shares) == 1000 and all(s > 0 for s in shares), shares  # the group split the load

        # Kill one replica without warning, mid-stream; the survivor carries on.
        killer = asyncio.create_task(_burst(broker, 51, 101))
        await asyncio.sleep(0.3)
        replicas[0].kill(signal.SIGKILL)
        await killer
        survivor_before = await replicas[1].metric("edgefleet_hub_messages_stored_total", kind="event")
        await _burst(broker, 101, 151)
        # The survivor adopts the dead replica's broker session (after replica_takeover_seconds):
        # its queued share and whatever it held unacknowledged arrive, and the stream is whole again.
        await wait_until(lambda: _counts(pg_url)[0] == 3000, timeout=60, what="survivor stored everything")
        assert "adopting the broker session" in replicas[1].log()

        # The killed replica comes back and takes its session back; the adopter lets go, no tug of war.
        replicas[0].start()
        await replicas[0].wait_ready()
        await wait_until(lambda: "released its session" in replicas[1].log(), timeout=30, what="adopter let go")
        await _burst(broker, 151, 161)
        await wait_until(lambda: _counts(pg_url)[0] == 3200, timeout=60, what="both replicas ingest again")
        assert await replicas[0].metric("edgefleet_hub_messages_stored_total", kind="event") > 0
        events, distinct, history = _counts(pg_url)
        assert events == distinct == 3200
        assert history == 20 * 16
        for site in SITES:
            assert _seqs(pg_url, site) == list(range(1, 161))
        assert await replicas[1].metric("edgefleet_hub_messages_stored_total", kind="event") > survivor_before
    finally:
        for r in replicas:
            r.kill()
