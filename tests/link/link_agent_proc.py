"""A real agent process for the link tests: runs link.run and emits numbered events.

    python link_agent_proc.py CONFIG_JSON START COUNT INTERVAL

Prints ``CONFIRMED <seq> <msg_id> <i>`` once each event is committed to the outbox (what a
caller of ctx.emit can rely on), then ``EMITTED`` and keeps the link running until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

from agent import link
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.state import StateStore


async def main(config: AgentConfig, start: int, count: int, interval: float) -> None:
    store = StateStore.open(config.state_dir)
    ctx = AgentContext(config=config, store=store)
    task = asyncio.create_task(link.run(ctx))
    for i in range(start, start + count):
        event = ctx.emit("test.outage", f"event {i}", data={"i": i})
        print("CONFIRMED", event.seq, event.msg_id, i, flush=True)
        await asyncio.sleep(interval)
    print("EMITTED", flush=True)
    await task


if __name__ == "__main__":
    doc = json.loads(sys.argv[1])
    asyncio.run(main(AgentConfig(**doc), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
