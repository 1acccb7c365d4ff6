"""Fixtures for the snapshot tests: a real etcd, an agent context around it, event readers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import outbox
from agent.config import AgentConfig, SnapshotConfig
from agent.context import AgentContext
from agent.snapshots import catalog, devetcd
from agent.state import StateStore


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[devetcd.Node]:
    async with devetcd.running(tmp_path / "etcd-data", log=tmp_path / "etcd.log") as node:
        yield node


MakeCtx = Callable[..., AgentContext]


@pytest.fixture
def make_ctx(tmp_path: Path) -> Iterator[MakeCtx]:
    stores: list[StateStore] = []

    def make(endpoint: str, **snapshot: Any) -> AgentContext:
        settings: dict[str, Any] = {"preset": "custom", "endpoint": endpoint, "min_free_bytes": 0}
        settings["timeout_seconds"] = 30
        settings.update(snapshot)
        config = AgentConfig(site_id="site-a", state_dir=tmp_path / "state", snapshots=SnapshotConfig(**settings))
        store = StateStore.open(config.state_dir)
        stores.append(store)
        outbox.setup(store)
        catalog.setup(store)
        return AgentContext(config=config, store=store)

    yield make
    for store in stores:
        store.close()


def events(ctx: AgentContext, prefix: str = "snapshot.") -> list[dict[str, Any]]:
    rows = outbox.pending(ctx.store, limit=10_000)
    docs = [json.loads(r.payload) for r in rows if r.channel.value == "events"]
    return [d for d in docs if d["type"].startswith(prefix)]


def snapshot_files(ctx: AgentContext) -> list[str]:
    return sorted(p.name for p in ctx.config.snapshot_dir.iterdir() if not p.name.startswith("."))


async def put_keys(node: devetcd.Node, count: int, *, prefix: str = "/registry/test/") -> None:
    for i in range(count):
        await node.ctl("put", f"{prefix}{i:04d}", f"value-{i}")


def put_random(node: devetcd.Node, megabytes: int) -> None:
    """Incompressible bulk data through etcd's JSON gateway (one 1 MB value per key)."""
    import base64
    import os
    import urllib.request

    for i in range(megabytes):
        body = json.dumps(
            {
                "key": base64.b64encode(f"/bulk/{i}".encode()).decode(),
                "value": base64.b64encode(os.urandom(1 << 20)).decode(),
            }
        ).encode()
        urllib.request.urlopen(urllib.request.Request(f"{node.url}/v3/kv/put", data=body), timeout=30).read()
