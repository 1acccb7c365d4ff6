"""Store-level behaviour on SQLite and PostgreSQL: forward-only status, retention, migrations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from hub_harness import event, status

from agent import protocol
from hub.models import STATUS_HISTORY
from hub.store import Received, open_store


def _recv(msg: protocol.Message, at: datetime, *, retained: bool = False) -> Received:
    return Received(message=msg, received_at=at, retained=retained, raw=msg.to_bytes())


def test_latest_status_only_moves_forward(db_url: str) -> None:
    store = open_store(db_url)
    try:
        now = datetime.now(UTC)
        store.write_batch([_recv(status("s1", 10, state="red"), now)])
        store.write_batch([_recv(status("s1", 9, state="green"), now)])  # an old one, late
        assert store.get_site("s1")["state"] == "red"  # type: ignore[index]
        # An agent whose state was wiped restarts its sequence; its clock being well ahead wins.
        reset = status("s1", 1, state="yellow").model_copy(update={"ts": now + timedelta(minutes=10)})
        store.write_batch([_recv(reset, now)])
        site = store.get_site("s1")
        assert site is not None and site["state"] == "yellow" and site["status_seq"] == 1
        assert site["status"]["state"] == "yellow"
        # A retained status replayed by the broker never looks fresher than the site's own clock says.
        old = status("s2", 3).model_copy(update={"ts": now - timedelta(hours=2)})
        store.write_batch([_recv(old, now, retained=True)])
        assert store.get_site("s2")["status_at"] == old.ts  # type: ignore[index]
        store.migrate()  # idempotent
        assert store.current_revision() == "0002"
    finally:
        store.close()


def test_history_downsampling_keeps_changes_and_one_per_bucket(db_url: str) -> None:
    store = open_store(db_url)
    try:
        now = datetime.now(UTC)
        day = timedelta(days=1)
        items = []
        # 3 days ago: one sample per minute for an hour, with a state change at minute 30.
        for minute in range(60):
            at = now - 3 * day + timedelta(minutes=minute)
            st = status("s1", minute + 1, state="yellow" if minute >= 30 else "green")
            items.append(_recv(st.model_copy(update={"ts": at}), at))
        # Recent: 10 samples, all kept at full resolution.
        for i in range(10):
            at = now - timedelta(minutes=10 - i)
            items.append(_recv(status("s1", 100 + i).model_copy(update={"ts": at}), at))
        # 100 days ago: beyond retention.
        items.append(_recv(status("s1", 0).model_copy(update={"ts": now - 100 * day}), now - 100 * day))
        for item in items:  # one per batch, as they would arrive
            store.write_batch([item])
        deleted = store.downsample_history(
            full_resolution=day, bucket=timedelta(minutes=15), retention=timedelta(days=90), now=now
        )
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(STATUS_HISTORY.c.received_at, STATUS_HISTORY.c.changed)).all()
        old = [r for r in rows if r.received_at < now - day]
        recent = [r for r in rows if r.received_at >= now - day]
        assert len(recent) == 10
        # The hour spans 4 or 5 fifteen-minute buckets; the first sample and the change are "changed" rows.
        unchanged_kept = [r for r in old if not r.changed]
        assert 4 <= len(unchanged_kept) <= 5
        assert sum(1 for r in old if r.changed) == 2
        assert deleted == 61 - len(old)
        # Idempotent: a second sweep deletes nothing more.
        assert (
            store.downsample_history(
                full_resolution=day, bucket=timedelta(minutes=15), retention=timedelta(days=90), now=now
            )
            == 0
        )
    finally:
        store.close()


def test_events_are_stored_once_per_msg_id(db_url: str) -> None:
    store = open_store(db_url)
    try:
        now = datetime.now(UTC)
        ev = event("s1", 1)
        r1 = store.write_batch([_recv(ev, now), _recv(ev, now)])
        r2 = store.write_batch([_recv(ev, now)])
        assert r1.stored == {"event": 1} and r1.duplicates == {"event": 1}
        assert r2.stored == {} and r2.duplicates == {"event": 1}
        assert len(store.site_events("s1")) == 1
    finally:
        store.close()
