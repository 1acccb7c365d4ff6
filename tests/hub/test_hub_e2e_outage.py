"""End to end: the real agent link → mosquitto → the real hub store, across a broker outage.

The broker is really stopped while the agent keeps emitting events (the 5-minute outage of the
issue, accelerated: what matters is that nothing can be delivered for a while and the agent's
reconnect attempts fail). After it returns, every event is in the hub store exactly once, in order.
The second variant also SIGKILLs the agent during the outage; its outbox survives on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hub_harness import Broker, hub_cfg, wait_until

from agent import link, outbox
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.state import StateStore
from hub import commands, service
from hub.models import EVENTS

SITE = "store-0042"


def _agent_config(tmp: Path, broker: Broker) -> AgentConfig:
    return AgentConfig(
        site_id=SITE,
        state_dir=tmp / "agent" / "state",
        trust_dir=tmp / "agent" / "trust",
        link={
            "host": broker.host,
            "port": broker.port,
            "backoff_min_seconds": 0.05,
            "backoff_max_seconds": 0.5,
            "publish_timeout_seconds": 3,
            "replay_rate_per_second": 500,
            "replay_burst": 100,
        },
    )


def _hub_events(hub: service.Hub) -> list[tuple[int, dict[str, Any]]]:
    with hub.ctx.store.engine.connect() as conn:
        rows = conn.execute(sa.select(EVENTS.c.seq, EVENTS.c.data).where(EVENTS.c.site == SITE).order_by(EVENTS.c.id))
        return [(r.seq, r.data) for r in rows]


def _outage_events(hub: service.Hub) -> list[int]:
    return [d["i"] for _seq, d in _hub_events(hub) if "i" in d]


def _assert_once_in_order(hub: service.Hub, n: int) -> None:
    got = _hub_events(hub)
    seqs = [s for s, _ in got]
    assert len(seqs) == len(set(seqs)), "an event was stored twice"
    assert seqs == sorted(seqs), "events stored out of order"
    assert _outage_events(hub) == list(range(n))


@contextlib.asynccontextmanager
async def _task(coro: Any) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        # Bounded: this test is about the hub store; an agent link that is slow to stop on
        # cancellation is reported as a warning here (the link's own tests own that behaviour).
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            warnings.warn("agent link.run did not stop within 10 s of cancellation", stacklevel=1)
        else:
            with contextlib.suppress(asyncio.CancelledError):
                task.result()


async def test_outage_every_event_once_and_in_order(broker: Broker, db_url: str, tmp_path: Path) -> None:
    key_path, pub_path, _kid = commands.keygen(tmp_path / "hubkeys")
    cfg = hub_cfg(
        broker=broker,
        db_url=db_url,
        tmp=tmp_path,
        commands={"key_file": str(key_path)},
        mqtt={"reconnect_max_seconds": 0.5},
    )
    agent_cfg = _agent_config(tmp_path, broker)
    agent_cfg.trust_dir.mkdir(parents=True)
    (agent_cfg.trust_dir / "hub-command.pub").write_bytes(pub_path.read_bytes())
    store = StateStore.open(agent_cfg.state_dir)
    ctx = AgentContext(config=agent_cfg, store=store)
    try:
        async with service.running(cfg) as hub, _task(link.run(ctx)) as agent_task:
            await wait_until(hub.ingest.subscribed.is_set, what="hub subscribed")
            for i in range(10):
                ctx.emit("test.outage", f"event {i}", data={"i": i})
            await wait_until(lambda: len(_outage_events(hub)) == 10, timeout=45, what="first events")
            site = hub.ctx.store.get_site(SITE)
            assert site is not None and site["online"] is True

            broker.stop()
            for i in range(10, 60):  # events keep coming while nothing can be delivered
                ctx.emit("test.outage", f"event {i}", data={"i": i})
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.5)  # several failed reconnects on both sides
            assert outbox.stats(store).messages >= 50
            broker.start()
            for i in range(60, 70):
                ctx.emit("test.outage", f"event {i}", data={"i": i})
            try:
                await wait_until(lambda: len(_outage_events(hub)) >= 70, timeout=60, what="all events")
            except AssertionError:
                got = _outage_events(hub)
                received = hub.ctx.metrics.registry.get_sample_value(
                    "edgefleet_hub_messages_received_total", {"channel": "events"}
                )
                raise AssertionError(
                    f"hub has {len(got)} events {got}; agent outbox {outbox.stats(store)}; hub received {received}"
                ) from None
            _assert_once_in_order(hub, 70)

            # And the other direction over the same link: a signed command, answered by the agent.
            async with httpx.AsyncClient(base_url=hub.api_url) as http:
                r = await http.post(
                    f"/api/v1/sites/{SITE}/commands",
                    json={"name": "report-now"},
                    headers={"Authorization": "Bearer w-secret"},
                )
                assert r.status_code == 202, r.text
                cmd_id = r.json()["cmd_id"]
            await wait_until(
                lambda: hub.ctx.store.get_command(cmd_id)["state"] == "done",
                timeout=45,  # type: ignore[index]
                what="command answered",
            )
            assert not agent_task.done()
    finally:
        store.close()


AGENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from agent import link
    from agent.config import AgentConfig
    from agent.context import AgentContext
    from agent.state import StateStore

    cfg = AgentConfig(**json.loads(sys.argv[1]))
    start, end = int(sys.argv[2]), int(sys.argv[3])
    store = StateStore.open(cfg.state_dir)
    ctx = AgentContext(config=cfg, store=store)

    async def main():
        task = asyncio.create_task(link.run(ctx))
        for i in range(start, end):
            ctx.emit("test.outage", f"event {i}", data={"i": i})
            await asyncio.sleep(0.01)
        print("emitted", flush=True)
        await task

    asyncio.run(main())
    """
)


def _spawn_agent(cfg: AgentConfig, start: int, end: int, *, log: Path) -> subprocess.Popen[bytes]:
    doc = cfg.model_dump(mode="json")
    with open(log, "ab") as out:  # a file, not a pipe: a full pipe would stall the agent
        return subprocess.Popen(
            [sys.executable, "-c", AGENT_SCRIPT, json.dumps(doc), str(start), str(end)], stdout=out, stderr=out
        )


@pytest.mark.slow
async def test_outage_with_agent_sigkilled(broker: Broker, tmp_path: Path, pg_url: str) -> None:
    cfg = hub_cfg(broker=broker, db_url=pg_url, tmp=tmp_path, mqtt={"reconnect_max_seconds": 0.5})
    agent_cfg = _agent_config(tmp_path, broker)
    async with service.running(cfg, serve_api=False) as hub:
        await wait_until(hub.ingest.subscribed.is_set, what="hub subscribed")
        first = _spawn_agent(agent_cfg, 0, 10, log=tmp_path / "agent1.log")
        try:
            await wait_until(lambda: len(_outage_events(hub)) == 10, timeout=30, what="first events")
        finally:
            first.kill()
            first.wait()
        broker.stop()
        log2 = tmp_path / "agent2.log"
        second = _spawn_agent(agent_cfg, 10, 60, log=log2)  # emits during the outage ...
        try:
            await wait_until(lambda: "emitted" in log2.read_text(), timeout=30, what="outage events emitted")
            await asyncio.sleep(1.0)
        finally:
            second.kill()  # ... and dies without warning before it could deliver anything
            second.wait()
        broker.start()
        third = _spawn_agent(agent_cfg, 60, 70, log=tmp_path / "agent3.log")
        try:
            await wait_until(lambda: len(_outage_events(hub)) >= 70, timeout=60, what="all events")
            _assert_once_in_order(hub, 70)
        finally:
            third.kill()
            third.wait()
