"""MQTT 3.1.1 brokers: mosquitto with protocol 3.1.1, and amqtt (no MQTT 5, no shared subscriptions)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hub_harness import Broker, event, free_port, hub_cfg, publish, publisher, status, wait_until

from agent import protocol
from hub import service


async def _ingest_some(cfg: Any, broker: Any) -> None:
    async with service.running(cfg, serve_api=False) as hub:
        await wait_until(hub.ingest.subscribed.is_set, what="subscription")
        async with publisher(broker) as pub:
            await publish(pub, status("site-a", 1), channel=protocol.Channel.STATUS)
            for seq in range(2, 12):
                await publish(pub, event("site-a", seq), channel=protocol.Channel.EVENTS)
            await pub.publish("edgefleet/v1/sites/site-b/events", event("site-a", 99).to_bytes(), qos=1)
        await wait_until(lambda: len(hub.ctx.store.site_events("site-a")) == 10, timeout=20, what="events")
        assert hub.ctx.store.get_site("site-a")["state"] == "green"  # type: ignore[index]
        assert hub.ctx.store.get_site("site-b") is None


async def test_mosquitto_over_mqtt_311(broker: Broker, tmp_path: Path) -> None:
    cfg = hub_cfg(
        broker=broker,
        db_url=f"sqlite:///{tmp_path / 'h.db'}",
        tmp=tmp_path,
        mqtt={"protocol": "3.1.1", "shared_subscriptions": True},
    )  # shared is ignored on 3.1.1
    await _ingest_some(cfg, broker)


@contextlib.asynccontextmanager
async def _amqtt(port: int) -> AsyncIterator[Any]:
    amqtt_broker = pytest.importorskip("amqtt.broker")
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    b = amqtt_broker.Broker(config)
    await b.start()
    try:
        yield b
    finally:
        await b.shutdown()


async def test_amqtt_broker(tmp_path: Path) -> None:
    port = free_port()

    class _Addr:
        host = "127.0.0.1"

    addr = _Addr()
    addr.port = port  # type: ignore[attr-defined]
    async with _amqtt(port):
        await asyncio.sleep(0.2)
        cfg = hub_cfg(
            broker=addr,
            db_url=f"sqlite:///{tmp_path / 'h.db'}",
            tmp=tmp_path,  # type: ignore[arg-type]
            mqtt={"protocol": "3.1.1"},
        )
        await _ingest_some(cfg, addr)
