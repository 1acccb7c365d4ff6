"""The outbox: every message for the hub is written here before it is published.

A row is deleted only after the broker acknowledged it (PUBACK), so a crash, a power loss or
a weeks-long outage loses nothing: the store runs SQLite in WAL mode with ``synchronous=FULL``
and a row is committed before :func:`enqueue` returns.

Bounds and what gives (docs/protocol.md, "Outbox"):

* Status samples are compacted: only the newest unsent status is kept (latest wins).
* Events and replies are never compacted. They are bounded by count, bytes and age
  (:class:`Limits`). When a bound is exceeded, the outbox drops unsent rows down to 98 % of
  the bound, *lowest severity first, oldest first within a severity* (info events, then
  warnings and replies, then errors), and writes one ``outbox.overflow`` error event saying
  how many, which sequence numbers and which event types were lost; the
  ``edgefleet_outbox_dropped_total`` counter counts them too. The site keeps working: refusing
  new events instead would blind the hub to the newest state, which matters most when the link
  comes back. Dropping to a low-water mark batches the work; an unsent overflow report is folded
  into the next one (cumulative), so reports cannot themselves fill the outbox.
* Rows older than the age bound are dropped the same way (reason ``age``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import weakref
from collections import Counter as _Tally
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from agent import protocol
from agent.state import StateStore

log = structlog.get_logger("edgefleet.outbox")

MIGRATIONS = [
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        msg_id TEXT NOT NULL UNIQUE,
        seq INTEGER NOT NULL,
        payload BLOB NOT NULL,
        created REAL NOT NULL
    )""",
    "CREATE INDEX outbox_channel ON outbox(channel, id)",
    # Bounds: payload size kept beside the blob (SUM without reading blobs), eviction priority.
    "ALTER TABLE outbox ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
    "UPDATE outbox SET size=length(payload)",
    "CREATE INDEX outbox_evict ON outbox(priority, id)",
    # Running totals kept by triggers, so the bound check on every enqueue is O(1), not a scan.
    """CREATE TABLE outbox_totals (
        id INTEGER PRIMARY KEY CHECK (id = 1), count INTEGER NOT NULL, bytes INTEGER NOT NULL
    )""",
    "INSERT INTO outbox_totals(id, count, bytes) SELECT 1, COUNT(*), COALESCE(SUM(size), 0) FROM outbox",
    """CREATE TRIGGER outbox_totals_insert AFTER INSERT ON outbox BEGIN
        UPDATE outbox_totals SET count = count + 1, bytes = bytes + NEW.size WHERE id = 1;
    END""",
    """CREATE TRIGGER outbox_totals_delete AFTER DELETE ON outbox BEGIN
        UPDATE outbox_totals SET count = count - 1, bytes = bytes - OLD.size WHERE id = 1;
    END""",
]

SEQ_KEY = "protocol.seq"
LIMITS_KEY = "outbox.limits"
#: After an overflow the outbox is trimmed to this fraction of each bound.
LOW_WATER = 0.98
OVERFLOW_EVENT = "outbox.overflow"
OVERFLOW_PENDING_KEY = "outbox.overflow_pending"

DROPPED = Counter(
    "edgefleet_outbox_dropped_total", "Unsent messages dropped from the outbox because a bound was reached", ["reason"]
)
OVERFLOWS = Counter("edgefleet_outbox_overflow_total", "Times the outbox hit a bound and dropped messages")
DEPTH = Gauge("edgefleet_outbox_messages", "Messages waiting in the outbox")
DEPTH_BYTES = Gauge("edgefleet_outbox_bytes", "Payload bytes waiting in the outbox")

_PRIORITY = {protocol.Severity.INFO: 0, protocol.Severity.WARNING: 1, protocol.Severity.ERROR: 2}
_ready: weakref.WeakSet[StateStore] = weakref.WeakSet()
_wakeups: weakref.WeakKeyDictionary[StateStore, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class Limits:
    max_messages: int = 100_000
    max_bytes: int = 256 * 1024 * 1024
    max_age_seconds: float = 30 * 24 * 3600.0


@dataclass(frozen=True)
class Pending:
    id: int
    channel: protocol.Channel
    msg_id: str
    seq: int
    payload: bytes


@dataclass(frozen=True)
class Stats:
    messages: int
    bytes: int
    oldest_age_seconds: float | None


def setup(store: StateStore) -> None:
    store.migrate("outbox", MIGRATIONS)
    _ready.add(store)


def _ensure(store: StateStore) -> None:
    # Writers (events.emit from any module, CLI processes) must not depend on who ran setup first.
    if store not in _ready:
        setup(store)


def configure(store: StateStore, limits: Limits) -> None:
    """Persist the bounds, so every process writing to this outbox enforces the same ones."""
    _ensure(store)
    store.put(LIMITS_KEY, asdict(limits))


def limits(store: StateStore) -> Limits:
    raw = store.get(LIMITS_KEY)
    return Limits(**raw) if isinstance(raw, dict) else Limits()


def next_seq(store: StateStore) -> int:
    return store.next_counter(SEQ_KEY)


def _priority(message: protocol.Message, channel: protocol.Channel) -> int:
    if isinstance(message, protocol.Event):
        return _PRIORITY[message.severity]
    return 1 if channel is protocol.Channel.REPLIES else 0


def enqueue(store: StateStore, message: protocol.Message, *, channel: protocol.Channel) -> None:
    """Persist ``message`` for publishing. Status rows replace older unsent status rows.

    Enqueueing the same ``msg_id`` twice is a no-op while the first is unsent (that is what
    makes re-sending a stored command reply idempotent).
    """
    _ensure(store)
    payload = message.to_bytes()
    cap = protocol.MAX_BYTES[channel]
    if len(payload) > cap:
        # An oversized row would be refused by the hub (or kill the connection at the broker's packet
        # limit) on every replay: keep the message, drop its bulky ``data``, say so.
        if "data" not in type(message).model_fields:
            log.error("message over the protocol cap not queued", channel=channel.value, bytes=len(payload), cap=cap)
            return
        message = message.model_copy(update={"data": {"truncated": True, "original_bytes": len(payload)}})
        payload = message.to_bytes()
    with store.transaction() as db:
        if channel is protocol.Channel.STATUS:
            db.execute("DELETE FROM outbox WHERE channel=?", (channel.value,))
        db.execute(
            "INSERT OR IGNORE INTO outbox(channel, msg_id, seq, payload, created, size, priority) "
            "VALUES(?, ?, ?, ?, ?, ?, ?)",
            (
                channel.value, message.msg_id, message.seq, payload, message.ts.timestamp(), len(payload),
                _priority(message, channel),
            ),
        )
        enforce(store, site=message.site)
    _notify(store)


@contextlib.contextmanager
def watch(store: StateStore) -> Iterator[asyncio.Event]:
    """An event set whenever a row is enqueued into ``store`` (from any thread), so the link
    publishes new messages at once instead of on its next poll."""
    entry = (asyncio.get_running_loop(), asyncio.Event())
    _wakeups.setdefault(store, []).append(entry)
    try:
        yield entry[1]
    finally:
        _wakeups.get(store, []).remove(entry)


def _notify(store: StateStore) -> None:
    for loop, event in _wakeups.get(store, []):
        if not loop.is_closed():
            loop.call_soon_threadsafe(event.set)


def enforce(store: StateStore, *, site: str, now: float | None = None) -> int:
    """Apply the bounds; return how many rows were dropped (and reported)."""
    _ensure(store)
    bounds = limits(store)
    now = time.time() if now is None else now
    with store.transaction() as db:
        count, total = db.execute("SELECT count, bytes FROM outbox_totals WHERE id = 1").fetchone()
        cutoff = now - bounds.max_age_seconds
        victims: list[Any] = []
        # Rows are written in time order, so the aged ones are a prefix in id order: stop at the first young one
        # (after a backwards clock step a few aged rows may wait until they reach the front; nothing is lost).
        aged_query = "SELECT id, seq, size, payload, created FROM outbox WHERE channel != 'status' ORDER BY id"
        for row in db.execute(aged_query):
            if row["created"] >= cutoff:
                break
            victims.append(row)
        reason = "age" if victims else ""
        count -= len(victims)
        total -= sum(v["size"] for v in victims)
        if count > bounds.max_messages or total > bounds.max_bytes:
            reason = "size" if total > bounds.max_bytes else "count"
            keep_count = int(bounds.max_messages * LOW_WATER)
            keep_bytes = int(bounds.max_bytes * LOW_WATER)
            aged = {v["id"] for v in victims}
            for row in db.execute(
                "SELECT id, seq, size, payload FROM outbox WHERE channel != 'status' ORDER BY priority, id"
            ):
                if count <= keep_count and total <= keep_bytes:
                    break
                if row["id"] in aged:
                    continue
                victims.append(row)
                count -= 1
                total -= row["size"]
        if not victims:
            return 0
        db.executemany("DELETE FROM outbox WHERE id=?", [(v["id"],) for v in victims])
        _report(store, site=site, victims=victims, reason=reason, bounds=bounds)
    return len(victims)


def _report(store: StateStore, *, site: str, victims: list[Any], reason: str, bounds: Limits) -> None:
    types: _Tally[str] = _Tally()
    for v in victims:
        kind = _peek(bytes(v["payload"]))
        types[kind] += 1
    seqs = sorted(v["seq"] for v in victims)
    dropped, first, reasons = len(victims), seqs[0], {reason: len(victims)}
    # An unsent earlier report is folded into this one (cumulative), so that a long outage yields
    # one growing report instead of reports crowding out the events they are about.
    earlier = store.get(OVERFLOW_PENDING_KEY)
    row = store.db.execute("SELECT id, payload FROM outbox WHERE msg_id=?", (earlier,)).fetchone() if earlier else None
    if row is not None:
        previous = json.loads(bytes(row["payload"])).get("data", {})
        dropped += int(previous.get("dropped", 0))
        first = min(first, int(previous.get("first_seq", first)))
        types.update(previous.get("types", {}))
        for name, n in previous.get("reasons", {}).items():
            reasons[name] = reasons.get(name, 0) + int(n)
        store.db.execute("DELETE FROM outbox WHERE id=?", (row["id"],))
    data = {
        "dropped": dropped,
        "reason": reason,
        "reasons": reasons,
        "first_seq": first,
        "last_seq": seqs[-1],
        "types": dict(types.most_common(20)),
        "max_messages": bounds.max_messages,
        "max_bytes": bounds.max_bytes,
        "max_age_seconds": bounds.max_age_seconds,
    }
    summary = (
        f"outbox bound reached ({reason}): {dropped} unsent messages dropped, seq {first}..{seqs[-1]}; "
        "the link has been down too long or the site is too chatty"
    )
    event = protocol.Event(
        site=site, seq=next_seq(store), type=OVERFLOW_EVENT, summary=summary,
        severity=protocol.Severity.ERROR, data=data,
    )
    payload = event.to_bytes()
    store.db.execute(
        "INSERT INTO outbox(channel, msg_id, seq, payload, created, size, priority) VALUES(?, ?, ?, ?, ?, ?, ?)",
        (protocol.Channel.EVENTS.value, event.msg_id, event.seq, payload, event.ts.timestamp(), len(payload), 2),
    )
    store.put(OVERFLOW_PENDING_KEY, event.msg_id)
    DROPPED.labels(reason=reason).inc(len(victims))
    OVERFLOWS.inc()
    log.error(summary, event_type=OVERFLOW_EVENT, msg_id=event.msg_id, seq=event.seq, **data)


def _peek(payload: bytes) -> str:
    """The event type (or channel kind) of a dropped row, for the overflow report."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return "unknown"
    if isinstance(doc, dict):
        return str(doc.get("type") or doc.get("kind") or "unknown")[:100]
    return "unknown"


def pending(store: StateStore, *, limit: int = 100, after: int = 0) -> list[Pending]:
    """The next unsent rows with ``id > after``, in the order they were written."""
    _ensure(store)
    rows = store.db.execute(
        "SELECT id, channel, msg_id, seq, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
    ).fetchall()
    return [_pending(r) for r in rows]


def latest_status(store: StateStore) -> Pending | None:
    """The unsent status, if any: sent first after a reconnect, so the hub's staleness check
    is satisfied at once instead of after the whole backlog."""
    _ensure(store)
    row = store.db.execute(
        "SELECT id, channel, msg_id, seq, payload FROM outbox WHERE channel='status' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return None if row is None else _pending(row)


def _pending(row: Any) -> Pending:
    return Pending(
        id=row["id"], channel=protocol.Channel(row["channel"]), msg_id=row["msg_id"], seq=row["seq"],
        payload=bytes(row["payload"]),
    )


def ack(store: StateStore, row_id: int) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM outbox WHERE id=?", (row_id,))


def stats(store: StateStore, *, now: float | None = None) -> Stats:
    _ensure(store)
    count, total = store.db.execute("SELECT count, bytes FROM outbox_totals WHERE id = 1").fetchone()
    first = store.db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
    oldest = None if first is None else first["created"]
    DEPTH.set(count)
    DEPTH_BYTES.set(total)
    age = None if oldest is None else max(0.0, (time.time() if now is None else now) - oldest)
    return Stats(messages=count, bytes=total, oldest_age_seconds=age)
