"""Staleness (no status within N intervals) and the Last Will (online=false)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from hub_harness import Broker, hub_cfg, publish, publisher, status, wait_until

from agent import protocol
from hub import service
from hub.notify import Change


async def test_stale_after_n_intervals_and_fresh_again(broker: Broker, tmp_path: Path) -> None:
    cfg = hub_cfg(broker=broker, db_url=f"sqlite:///{tmp_path / 'h.db'}", tmp=tmp_path, staleness_factor=3.0)
    async with service.running(cfg, serve_api=False) as hub, hub.ctx.notifier.subscribe() as changes:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        store = hub.ctx.store
        async with publisher(broker) as pub:
            await publish(pub, status("site-a", 1, interval=0.4), channel=protocol.Channel.STATUS)
            await publish(pub, status("site-b", 1, interval=60), channel=protocol.Channel.STATUS)
            await wait_until(lambda: store.get_site("site-a") is not None, what="site-a stored")
            assert store.get_site("site-a")["stale"] is False  # type: ignore[index]
            # 3 x 0.4 s without a status: stale. site-b (60 s interval) stays fresh.
            await wait_until(lambda: store.get_site("site-a")["stale"], timeout=5, what="site-a stale")  # type: ignore[index]
            assert store.get_site("site-b")["stale"] is False  # type: ignore[index]
            assert store.list_sites(stale=True)[0] == 1
            await publish(pub, status("site-a", 2, interval=0.4), channel=protocol.Channel.STATUS)
            await wait_until(lambda: store.get_site("site-a")["status_seq"] == 2, what="new status")  # type: ignore[index]
            assert store.get_site("site-a")["stale"] is False  # type: ignore[index]
        seen: list[Change] = []
        while not changes.empty():
            seen.append(changes.get_nowait())
        assert any(c.kind == "site" and c.site == "site-a" and c.detail.get("stale") is True for c in seen)


async def test_last_will_marks_site_offline(broker: Broker, tmp_path: Path) -> None:
    cfg = hub_cfg(broker=broker, db_url=f"sqlite:///{tmp_path / 'h.db'}", tmp=tmp_path)
    async with service.running(cfg, serve_api=False) as hub:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        store = hub.ctx.store
        will_msg = protocol.Online(site="site-w", seq=1, online=False)
        # The "agent" connection: a real MQTT client holding a Last Will, killed without DISCONNECT.
        agent = subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                broker.host,
                "-p",
                str(broker.port),
                "-i",
                "site-w-agent",
                "-t",
                "nothing/here",
                "--will-topic",
                protocol.topic("site-w", protocol.Channel.ONLINE),
                "--will-payload",
                will_msg.to_bytes().decode(),
                "--will-qos",
                "1",
                "--will-retain",
            ],
        )
        try:
            async with publisher(broker) as pub:
                await publish(pub, protocol.Online(site="site-w", seq=2, online=True), channel=protocol.Channel.ONLINE)
                await publish(pub, status("site-w", 3), channel=protocol.Channel.STATUS)
            await wait_until(lambda: (store.get_site("site-w") or {}).get("online") is True, what="online")
            await asyncio.sleep(0.5)
            agent.kill()
            agent.wait()
            await wait_until(lambda: store.get_site("site-w")["online"] is False, timeout=20, what="will")  # type: ignore[index]
        finally:
            agent.kill()
            agent.wait()
