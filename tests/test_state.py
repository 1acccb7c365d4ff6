from __future__ import annotations

from pathlib import Path

import pytest

from agent import events, outbox, protocol
from agent.state import StateStore


def test_migrations_apply_once_and_extend(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    store.migrate("m", ["CREATE TABLE a (x INTEGER)"])
    store.migrate("m", ["CREATE TABLE a (x INTEGER)", "CREATE TABLE b (y INTEGER)"])
    names = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"a", "b"} <= names


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    store.put("k", 1)
    with pytest.raises(RuntimeError), store.transaction():
        store.put("k", 2)
        raise RuntimeError("boom")
    assert store.get("k") == 1


def test_events_survive_reopen_in_order(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    outbox.setup(store)
    for i in range(5):
        events.emit(store, site="s1", type="test.event", summary=f"event {i}")
    store.close()
    store = StateStore.open(tmp_path)
    rows = outbox.pending(store)
    assert [r.seq for r in rows] == sorted(r.seq for r in rows) and len(rows) == 5
    assert all(r.channel is protocol.Channel.EVENTS for r in rows)
