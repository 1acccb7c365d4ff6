"""Broker down during a whole degradation episode: same behaviour on site, and every transition
reaches the real hub (agent link → mosquitto → hub store) once the broker returns, in order."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import degrade_helpers as h
import pytest
import sqlalchemy as sa

import sim.testing
from agent import degrade, kube, link, outbox, sitestatus
from agent.context import AgentContext
from agent.degrade import records

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))
from hub_harness import Broker, hub_cfg  # noqa: E402

from hub import service  # noqa: E402
from hub.models import EVENTS  # noqa: E402

SITE = "store-0007"
SPEED = 10.0
ORIGINAL = {s.name: s.replicas for s in h.PLATFORM}


@contextlib.asynccontextmanager
async def _task(coro: Any) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _hub_transitions(hub: service.Hub) -> list[tuple[str, str]]:
    with hub.ctx.store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(EVENTS.c.data).where(EVENTS.c.site == SITE, EVENTS.c.type == "degradation.transition")
            .order_by(EVENTS.c.seq)
        )  # fmt: skip
        return [(r.data["from"], r.data["to"]) for r in rows]


async def _async(value: bool) -> bool:
    return value


@pytest.mark.slow
async def test_events_reach_the_hub_after_the_broker_returns(tmp_path: Path) -> None:
    broker = Broker(workdir=tmp_path / "broker")
    broker.start()
    cfg = hub_cfg(broker=broker, db_url=f"sqlite:///{tmp_path / 'hub.db'}", tmp=tmp_path,
                  mqtt={"reconnect_max_seconds": 0.5})  # fmt: skip
    try:
        async with sim.testing.running(speed=SPEED) as site, kube.connect(site.kubeconfig) as api:
            await h.deploy_platform(api)
            base = h.scaled_config(SITE, tmp_path / "agent", site.kubeconfig, speed=SPEED)
            config = base.model_copy(update={"link": base.link.model_copy(update={
                "host": broker.host, "port": broker.port, "backoff_min_seconds": 0.05, "backoff_max_seconds": 0.5,
                "publish_timeout_seconds": 3, "replay_rate_per_second": 500, "replay_burst": 100,
            })})  # fmt: skip
            ctx: AgentContext = h.context(config)
            async with service.running(cfg) as hub, _task(link.run(ctx)), _task(degrade.run(ctx)):
                await h.eventually(lambda: _async(hub.ingest.subscribed.is_set()), timeout=15, what="hub subscribed")
                await h.eventually(lambda: _async((ctx.store.get(sitestatus.DEGRADATION_KEY) or {}).get("state")
                                                  == "green"), timeout=15, what="green")  # fmt: skip
                # The whole path works before the outage: the hub knows the site is online.
                await h.eventually(lambda: _async(bool((hub.ctx.store.get_site(SITE) or {}).get("online"))),
                                   timeout=15, what="the site online at the hub")  # fmt: skip
                broker.stop()  # the broker is down for the whole episode

                await site.fail_node("agent-1")
                await h.eventually(lambda: _async((ctx.store.get(sitestatus.DEGRADATION_KEY) or {}).get("state")
                                                  == "yellow"), timeout=15, what="yellow")  # fmt: skip
                assert records.load(ctx.store), "tier 4 scaled down"
                await site.restore_node("agent-1")

                async def restored() -> bool:
                    replicas = {n: int(o["spec"]["replicas"]) for n, o in (await h.workloads(api)).items()}
                    return replicas == ORIGINAL and not records.load(ctx.store)

                await h.eventually(restored, timeout=40, what="restored with the broker down")
                pending = [(e["data"]["from"], e["data"]["to"]) for e in h.events(ctx.store, "degradation.transition")]
                assert pending == [("green", "yellow"), ("yellow", "green")]
                assert outbox.stats(ctx.store).messages >= len(h.events(ctx.store))
                assert _hub_transitions(hub) == []

                broker.start()
                await h.eventually(
                    lambda: _async(_hub_transitions(hub) == [("green", "yellow"), ("yellow", "green")]),
                    timeout=30, what="the transitions at the hub",
                )  # fmt: skip
                await h.eventually(lambda: _async(h.events(ctx.store) == []), timeout=15, what="the outbox drained")
            ctx.store.close()
    finally:
        broker.stop()
