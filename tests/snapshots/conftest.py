"""Fixtures for the snapshot tests: a real etcd, an agent context around it, event readers."""

from __future__ import annotations

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


@pytest.fixture
def make_ctx(tmp_path: Path) -> Iterator[Callable[..., AgentContext]]:
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
