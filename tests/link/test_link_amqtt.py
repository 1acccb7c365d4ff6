"""The link over MQTT 3.1.1 against amqtt (the pure-Python broker the demo may use)."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from link_harness import free_port, sign, write_hub_key

from agent import link, protocol
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.state import StateStore

amqtt_broker = pytest.importorskip("amqtt.broker")


async def test_events_and_commands_over_amqtt(tmp_path: Path) -> None:
    port = free_port()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        broker = amqtt_broker.Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "sys_interval": 0, "auth": {"allow-anonymous": True}, "topic-check": {"enabled": False},
        })
    await broker.start()
    config = AgentConfig(
        site_id="site-a", state_dir=tmp_path / "state", trust_dir=tmp_path / "trust",
        link={"port": port, "protocol": "3.1.1", "backoff_min_seconds": 0.05, "backoff_max_seconds": 0.5},
    )
    store = StateStore.open(config.state_dir)
    ctx = AgentContext(config=config, store=store)
    key = write_hub_key(config.trust_dir)
    got: list[protocol.Message] = []

    async def hub() -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier="hub", clean_session=False) as client:
            await client.subscribe(f"{protocol.TOPIC_ROOT}/+/+", qos=1)
            async for message in client.messages:
                if not str(message.topic).endswith("/commands"):
                    got.append(protocol.parse_site_message(str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]

    hub_task = asyncio.create_task(hub())
    link_task: asyncio.Task[Any] | None = None
    try:
        await asyncio.sleep(0.3)
        link_task = asyncio.create_task(link.run(ctx))
        emitted = [ctx.emit("test.amqtt", f"event {i}") for i in range(10)]
        for _ in range(200):
            if any(isinstance(m, protocol.Online) for m in got):
                break
            await asyncio.sleep(0.05)
        agent = type("A", (), {"ctx": ctx, "hub_key": key})()
        async with aiomqtt.Client("127.0.0.1", port, identifier="hub-cmd") as client:
            await client.publish(protocol.topic("site-a", protocol.Channel.COMMANDS),
                                 sign(agent, seq=1, name=protocol.CommandName.REPORT_NOW), qos=1)
        for _ in range(200):
            if any(isinstance(m, protocol.Reply) for m in got) and len(
                    [m for m in got if isinstance(m, protocol.Event)]) >= 10:
                break
            await asyncio.sleep(0.05)
    finally:
        for task in (link_task, hub_task):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (link_task, hub_task) if t is not None), return_exceptions=True)
        await broker.shutdown()
        store.close()
    assert [m.msg_id for m in got if isinstance(m, protocol.Event)] == [e.msg_id for e in emitted]
    (reply,) = [m for m in got if isinstance(m, protocol.Reply)]
    assert reply.status is protocol.ReplyStatus.DONE
    assert any(isinstance(m, protocol.Status) for m in got)
