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


def test_status_recomputes_snapshot_age_at_send_time(tmp_path: Path) -> None:
    from datetime import timedelta

    from agent import sitestatus

    store = StateStore.open(tmp_path)
    outbox.setup(store)
    last = protocol.now() - timedelta(hours=7)
    store.put(sitestatus.SNAPSHOT_KEY, {"last_success": last.isoformat(), "age_seconds": 5.0})
    status = sitestatus.build(store, site="s1", interval_seconds=30)
    assert status.snapshot is not None and status.snapshot.age_seconds is not None
    assert 7 * 3600 - 5 < status.snapshot.age_seconds < 7 * 3600 + 60


def test_event_history_outlives_delivery_and_is_bounded(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    outbox.setup(store)
    for i in range(events.HISTORY + 5):
        events.emit(store, site="s1", type="test.event", summary=f"event {i}")
    for row in outbox.pending(store, limit=1000):
        outbox.ack(store, row.id)
    assert outbox.pending(store) == []
    recent = events.recent(store, limit=3)
    assert [r["summary"] for r in recent] == [f"event {events.HISTORY + 4 - i}" for i in range(3)]
    (count,) = store.db.execute("SELECT COUNT(*) FROM event_log").fetchone()
    assert count == events.HISTORY
