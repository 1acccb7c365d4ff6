"""End to end over the shipped broker config: agent (site cert, sites listener) → mosquitto
(mTLS, ACLs) → the real hub (hub-CA cert, hub listener) → its store, across a broker outage;
a signed command back; and a rogue site that cannot get anything into another site's record."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import sqlalchemy as sa
from link_harness import HUB, Broker, agent_config, mqtt_client, running

from agent import link, outbox, protocol
from agent.context import AgentContext
from agent.state import StateStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))


async def _until(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_agent_to_hub_store_over_mtls_with_outage(broker: Broker, tmp_path: Path) -> None:
    from hub_harness import hub_cfg

    from hub import commands, service
    from hub.models import EVENTS

    key_path, pub_path, _ = commands.keygen(tmp_path / "hubkeys")
    cert, key = broker.pki.clients[HUB]
    cfg = hub_cfg(
        broker=SimpleNamespace(host="127.0.0.1", port=broker.hub_port),
        db_url=f"sqlite:///{tmp_path / 'hub.db'}",
        tmp=tmp_path,
        commands={"key_file": str(key_path)},
        mqtt={"tls": True, "ca_file": str(broker.pki.ca), "cert_file": str(cert), "key_file": str(key),
              "reconnect_max_seconds": 0.5},
    )
    agent_cfg = agent_config(tmp_path / "agent", broker, site="site-a")
    agent_cfg.trust_dir.mkdir(parents=True)
    (agent_cfg.trust_dir / protocol.HUB_COMMAND_KEY_FILE).write_bytes(pub_path.read_bytes())
    store = StateStore.open(agent_cfg.state_dir)
    ctx = AgentContext(config=agent_cfg, store=store)

    def stored(site: str) -> list[dict[str, Any]]:
        with hub.ctx.store.engine.connect() as conn:
            rows = conn.execute(sa.select(EVENTS.c.seq, EVENTS.c.data).where(EVENTS.c.site == site)
                                .order_by(EVENTS.c.id))
            return [{"seq": r.seq, **r.data} for r in rows]

    try:
        async with service.running(cfg) as hub, running(link.run(ctx)):
            await _until(hub.ingest.subscribed.is_set)
            for i in range(10):
                ctx.emit("test.e2e", f"event {i}", data={"i": i})
            await _until(lambda: len(stored("site-a")) == 10)
            broker.stop()
            for i in range(10, 40):
                ctx.emit("test.e2e", f"event {i}", data={"i": i})
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)
            assert outbox.stats(store).messages >= 30
            broker.start()
            await _until(lambda: len(stored("site-a")) >= 40, timeout=60)
            got = stored("site-a")
            assert [e["i"] for e in got] == list(range(40))  # exactly once, in order
            assert [e["seq"] for e in got] == sorted({e["seq"] for e in got})

            # A rogue site tries to write into site-a's record: the broker drops it (ACL), so the
            # hub never even sees it; the marker after it proves the rogue connection worked.
            async with mqtt_client(broker, "site-b") as rogue:
                forged = protocol.Event(site="site-a", seq=10**6, type="test.forged", summary="forged")
                await rogue.publish(protocol.topic("site-a", protocol.Channel.EVENTS), forged.to_bytes(), qos=1)
                marker = protocol.Event(site="site-b", seq=1, type="test.marker", summary="marker")
                await rogue.publish(protocol.topic("site-b", protocol.Channel.EVENTS), marker.to_bytes(), qos=1)
            await _until(lambda: len(stored("site-b")) == 1)
            assert all(e.get("i") is not None for e in stored("site-a"))

            # And back: a signed command through the hub API, answered by the agent.
            async with httpx.AsyncClient(base_url=hub.api_url) as http:
                r = await http.post("/api/v1/sites/site-a/commands", json={"name": "snapshot-now"},
                                    headers={"Authorization": "Bearer w-secret"})
                assert r.status_code == 202, r.text
                cmd_id = r.json()["cmd_id"]
            await _until(lambda: (hub.ctx.store.get_command(cmd_id) or {}).get("state") in ("accepted", "done"))
            assert ctx.snapshot_now.is_set()
    finally:
        store.close()
