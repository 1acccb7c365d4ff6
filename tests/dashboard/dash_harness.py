"""Helpers of the dashboard tests: a private mosquitto, a hub, a real agent link, headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

# Re-exported: the dashboard tests import them from here.
from brokers import free_port as free_port
from brokers import mosquitto as mosquitto

from agent import commands as agent_commands
from agent import link
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.state import StateStore
from hub import commands, service
from hub import config as hub_config

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "dashboard"
WRITE_TOKEN = "dash-write-token"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def hub_config_for(tmp: Path, broker_port: int, **overrides: Any) -> hub_config.HubConfig:
    key, _pub, _kid = commands.keygen(tmp / "hubkeys")
    doc: dict[str, Any] = {
        "db_url": f"sqlite:///{tmp / 'hub.db'}",
        "data_dir": str(tmp / "hubdata"),
        "log_format": "json",
        "staleness_check_seconds": 0.5,
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "client_id": f"hub-{uuid.uuid4().hex[:8]}"},
        "ingest": {"flush_interval_seconds": 0.05},
        "api": {"host": "127.0.0.1", "port": 0, "write_tokens": [WRITE_TOKEN]},
        "commands": {"key_file": str(key)},
    }
    for k, v in overrides.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    return hub_config.HubConfig(**doc)


def agent_context(tmp: Path, broker_port: int, site: str, *, hub_pub: Path, protocol: str = "5") -> AgentContext:
    cfg = AgentConfig(
        site_id=site,
        state_dir=tmp / site / "state",
        trust_dir=tmp / site / "trust",
        link={
            "host": "127.0.0.1",
            "port": broker_port,
            "protocol": protocol,
            "backoff_min_seconds": 0.05,
            "backoff_max_seconds": 0.5,
            "status_interval_seconds": 30,
        },
    )
    cfg.trust_dir.mkdir(parents=True)
    (cfg.trust_dir / "hub-command.pub").write_bytes(hub_pub.read_bytes())
    store = StateStore.open(cfg.state_dir)
    agent_commands.setup(store)
    return AgentContext(config=cfg, store=store)


@contextlib.asynccontextmanager
async def agent_link(ctx: AgentContext) -> AsyncIterator[asyncio.Task[None]]:
    """The agent's real MQTT link (status, events, commands and replies) as a task."""
    task = asyncio.create_task(link.run(ctx))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        ctx.store.close()


@contextlib.asynccontextmanager
async def hub_running(cfg: hub_config.HubConfig) -> AsyncIterator[service.Hub]:
    async with service.running(cfg) as hub:
        await wait_until(hub.ingest.subscribed.is_set, what="hub subscribed")
        yield hub


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], *, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.05)
