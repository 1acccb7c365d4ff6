"""The outbox on its own: persistence (reopen, SIGKILL), ordering, compaction, bounds, overflow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent import events, outbox, protocol
from agent.state import StateStore

ROOT = Path(__file__).resolve().parents[2]


def _emit(store: StateStore, n: int, *, severity: protocol.Severity = protocol.Severity.INFO) -> list[protocol.Event]:
    return [
        events.emit(store, site="s1", type="test.event", summary=f"event {i}", severity=severity, data={"i": i})
        for i in range(n)
    ]


def _events(store: StateStore) -> list[protocol.Event]:
    rows = outbox.pending(store, limit=1_000_000)
    return [protocol.Event.model_validate_json(r.payload) for r in rows if r.channel is protocol.Channel.EVENTS]


def test_rows_survive_reopen_in_order_and_ack_deletes(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    emitted = _emit(store, 5)
    store.close()
    store = StateStore.open(tmp_path)
    rows = outbox.pending(store)
    assert [r.msg_id for r in rows] == [e.msg_id for e in emitted]
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert rows[0].payload == emitted[0].to_bytes()  # byte-identical on every replay: msg ids are stable
    outbox.ack(store, rows[0].id)
    assert [r.msg_id for r in outbox.pending(store)] == [e.msg_id for e in emitted[1:]]
    assert outbox.pending(store, after=rows[2].id)[0].msg_id == emitted[3].msg_id
    store.close()


_WRITER = """
import sys
from pathlib import Path
from agent import events
from agent.state import StateStore
store = StateStore.open(Path(sys.argv[1]))
i = 0
while True:
    e = events.emit(store, site="s1", type="test.event", summary=f"event {i}")
    print("CONFIRMED", e.seq, e.msg_id, flush=True)
    i += 1
"""


def test_rows_survive_sigkill_mid_stream(tmp_path: Path) -> None:
    """Every event whose emit() returned is in the outbox after a SIGKILL, and the DB is intact."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, cwd=ROOT, text=True
    )
    assert proc.stdout is not None
    confirmed: list[tuple[int, str]] = []
    deadline = time.monotonic() + 30
    while len(confirmed) < 200 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line.startswith("CONFIRMED "):
            continue  # log output
        _, seq, msg_id = line.split()
        confirmed.append((int(seq), msg_id))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert len(confirmed) == 200
    store = StateStore.open(tmp_path)
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = [(e.seq, e.msg_id) for e in _events(store)]
    assert stored[: len(confirmed)] == confirmed  # all confirmed, in order (at most a few more unconfirmed)
    assert len(stored) - len(confirmed) <= 2
    store.close()


def test_status_is_compacted_latest_wins_but_events_never(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    statuses = [protocol.Status(site="s1", seq=outbox.next_seq(store), state=s) for s in protocol.SiteState]
    for i, status in enumerate(statuses):
        outbox.enqueue(store, status, channel=protocol.Channel.STATUS)
        _emit(store, 2)
        assert len([r for r in outbox.pending(store, limit=1000) if r.channel is protocol.Channel.STATUS]) == 1
        assert len(_events(store)) == 2 * (i + 1)
    latest = outbox.latest_status(store)
    assert latest is not None and latest.msg_id == statuses[-1].msg_id
    store.close()


def test_count_bound_drops_lowest_severity_oldest_first_and_reports_loudly(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    outbox.configure(store, outbox.Limits(max_messages=20, max_bytes=10**9, max_age_seconds=10**9))
    before = outbox.DROPPED.labels(reason="count")._value.get()
    errors = _emit(store, 3, severity=protocol.Severity.ERROR)
    infos = _emit(store, 40)
    kept = _events(store)
    assert len(outbox.pending(store, limit=1000)) <= 20
    overflow = [e for e in kept if e.type == outbox.OVERFLOW_EVENT]
    # One cumulative report while unsent (not one per batch crowding out the events themselves).
    assert len(overflow) == 1 and overflow[0].severity is protocol.Severity.ERROR
    dropped = overflow[0].data["dropped"]
    assert outbox.DROPPED.labels(reason="count")._value.get() - before == dropped
    regular = [e for e in kept if e.type != outbox.OVERFLOW_EVENT]
    # Nothing lost silently: every emitted event is either still queued or counted in an overflow report.
    assert len(regular) + dropped == 43
    # Errors outlive infos; the infos that survive are the newest, still in order.
    assert [e.msg_id for e in errors] == [e.msg_id for e in regular[:3]]
    surviving = [e.msg_id for e in regular[3:]]
    assert surviving == [e.msg_id for e in infos[len(infos) - len(surviving):]]
    assert overflow[0].data["types"] == {"test.event": overflow[0].data["dropped"]}
    assert overflow[0].data["first_seq"] == infos[0].seq
    store.close()


def test_byte_and_age_bounds(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    outbox.configure(store, outbox.Limits(max_messages=10**6, max_bytes=64 * 1024, max_age_seconds=3600))
    for i in range(40):
        events.emit(store, site="s1", type="test.big", summary="x", data={"blob": "y" * 4000, "i": i})
    assert outbox.stats(store).bytes <= 64 * 1024 + 8 * 1024  # the bound plus the overflow report
    assert any(e.type == outbox.OVERFLOW_EVENT and e.data["reason"] == "size" for e in _events(store))
    dropped = outbox.enforce(store, site="s1", now=time.time() + 7200)
    assert dropped > 0
    left = _events(store)
    assert len(left) == 1 and left[0].type == outbox.OVERFLOW_EVENT and left[0].data["reason"] == "age"
    store.close()


def test_oversized_event_keeps_its_summary_and_loses_its_data(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    events.emit(store, site="s1", type="test.huge", summary="keep me", data={"blob": "z" * protocol.MAX_EVENT_BYTES})
    (row,) = outbox.pending(store)
    assert len(row.payload) <= protocol.MAX_EVENT_BYTES
    event = protocol.parse_site_message(protocol.topic("s1", protocol.Channel.EVENTS), row.payload)
    assert isinstance(event, protocol.Event) and event.summary == "keep me" and event.data["truncated"] is True
    assert json.loads(row.payload)["data"]["original_bytes"] > protocol.MAX_EVENT_BYTES
    store.close()


def test_running_totals_match_the_rows(tmp_path: Path) -> None:
    """The O(1) bound check trusts trigger-maintained totals: they must equal a full count."""
    store = StateStore.open(tmp_path)
    outbox.configure(store, outbox.Limits(max_messages=30, max_bytes=10**9, max_age_seconds=10**9))
    _emit(store, 50)
    for row in outbox.pending(store, limit=7):
        outbox.ack(store, row.id)
    outbox.enqueue(store, protocol.Status(site="s1", seq=outbox.next_seq(store), state=protocol.SiteState.RED),
                   channel=protocol.Channel.STATUS)
    count, total = store.db.execute("SELECT COUNT(*), SUM(size) FROM outbox").fetchone()
    stats = outbox.stats(store)
    assert (stats.messages, stats.bytes) == (count, total)
    store.close()
