"""The fleet store: every database access of the hub goes through here.

One :class:`Store` per process wraps a SQLAlchemy engine; methods are synchronous and short
(the async parts of the hub call them through ``asyncio.to_thread``; FastAPI runs sync endpoints in
its thread pool). The same code runs on SQLite (default, zero setup) and PostgreSQL (for scale
and several replicas): upserts use each dialect's ``ON CONFLICT``, which both support.

Writes from ingest are idempotent by construction, because MQTT delivers at least once:

* status history, events and replies have a unique ``msg_id`` and are inserted with
  ``ON CONFLICT DO NOTHING``; a redelivered message changes nothing;
* the latest status of a site only moves forward: an upsert applies when the sequence number is
  higher (or, for an agent whose state was wiped and restarted its sequence, when the site's own
  timestamp is well past the stored one);
* command replies only move a command forward (accepted → done/failed/rejected), never back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from agent import protocol
from hub.models import (
    BUNDLES,
    COMMAND_COUNTERS,
    COMMANDS,
    EVENTS,
    HUB_REPLICAS,
    REPLIES,
    SITES,
    SNAPSHOTS,
    STATUS_HISTORY,
)

ALEMBIC_DIR = Path(__file__).with_name("alembic")
#: A site whose sequence went backwards is believed (agent state wiped) once its timestamp is this far ahead.
SEQ_RESET_GRACE = timedelta(minutes=5)
#: Arbitrary constant for the PostgreSQL advisory lock that serialises migrations of several replicas.
_MIGRATE_LOCK = 0x6564_6765_6875_62

#: Command states and how far along they are; replies never move a command backwards.
COMMAND_RANK = {
    "pending": 0,
    "published": 1,
    "accepted": 2,
    "done": 3,
    "failed": 3,
    "rejected": 3,
    "expired": 3,
}
FINAL_COMMAND_STATES = frozenset(s for s, r in COMMAND_RANK.items() if r == 3)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Received:
    """A validated site message as ingest hands it to the store."""

    message: protocol.Message
    received_at: datetime
    #: Delivered by the broker from its retained store (status/online), not live.
    retained: bool = False
    #: The validated payload as received: stored as the site's latest status without re-encoding.
    raw: bytes | None = None


@dataclass
class BatchResult:
    """What a batch write did: counts per channel and what changed, for metrics and notifications."""

    stored: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    sites: set[str] = field(default_factory=set)
    #: (site, event id, type) of newly stored events, in arrival order.
    events: list[tuple[str, int, str]] = field(default_factory=list)
    commands: set[str] = field(default_factory=set)
    #: Latency samples: seconds from the site's ``ts`` to the write, for stored status messages.
    latencies: list[float] = field(default_factory=list)


def summarize_status(status: protocol.Status) -> dict[str, Any]:
    """The compact projection kept in history (the full document lives only in ``sites.status``)."""
    unhealthy = [c.name for c in status.components if not c.healthy]
    return {
        "state_reason": status.state_reason[:200],
        "install_state": status.install_state,
        "bundle": f"{status.bundle.name}-{status.bundle.version}" if status.bundle else None,
        "components": len(status.components),
        "unhealthy": unhealthy[:50],
        "nodes": len(status.nodes),
        "nodes_ready": sum(1 for n in status.nodes if n.ready),
        "scaled_down": len(status.scaled_down),
        "snapshot_age_seconds": status.snapshot.age_seconds if status.snapshot else None,
    }


def _status_key(status: protocol.Status) -> tuple[str, str, str | None]:
    return (status.state.value, status.install_state, status.bundle.version if status.bundle else None)


class Store:
    """The fleet store. Create with :func:`open_store`; close with :meth:`close`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # Per-process caches that only save work; the database stays the authority.
        self._last_sample: dict[str, tuple[datetime, tuple[str, str, str | None]]] = {}
        self._last_snapshot: dict[str, datetime] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self.engine.dispose()

    def migrate(self) -> None:
        """Upgrade the schema to the newest Alembic revision (serialised across replicas on PostgreSQL)."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(ALEMBIC_DIR))
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
            cfg.attributes["connection"] = conn
            alembic_command.upgrade(cfg, "head")

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            try:
                return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            except sa.exc.DBAPIError:
                return None

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)

    # ---- ingest ----------------------------------------------------------------------------

    def write_batch(self, items: Sequence[Received], *, history_min_interval: float = 0.0) -> BatchResult:
        """Write a batch of validated messages in one transaction; idempotent under redelivery."""
        result = BatchResult()
        seen: set[str] = set()
        statuses: list[Received] = []
        events: list[Received] = []
        onlines: list[Received] = []
        replies: list[Received] = []
        for item in items:
            msg = item.message
            if msg.msg_id in seen:
                _bump(result.duplicates, msg)
                continue
            seen.add(msg.msg_id)
            if isinstance(msg, protocol.Status):
                statuses.append(item)
            elif isinstance(msg, protocol.Event):
                events.append(item)
            elif isinstance(msg, protocol.Online):
                onlines.append(item)
            elif isinstance(msg, protocol.Reply):
                replies.append(item)
        now = utcnow()
        with self.engine.begin() as conn:
            touched: dict[str, datetime] = {}
            if statuses:
                self._write_statuses(conn, statuses, now=now, result=result, min_interval=history_min_interval)
            if events:
                self._write_events(conn, events, result=result, touched=touched)
            if replies:
                self._write_replies(conn, replies, now=now, result=result, touched=touched)
            if onlines:
                self._write_onlines(conn, onlines, result=result)
            if touched:
                self._touch_sites(conn, touched)
                result.sites.update(touched)
        return result

    def _write_statuses(
        self, conn: Connection, items: list[Received], *, now: datetime, result: BatchResult, min_interval: float
    ) -> None:
        # The hot path (thousands per second): plain driver-level executemany with pre-encoded values,
        # because SQLAlchemy's per-value bind processing cost more than the database work.
        pg = self.dialect == "postgresql"
        dt = _pg_dt if pg else _sqlite_dt
        stored_at = dt(now)
        # Each timestamp encoded once per message (history and the site row share them).
        ts_enc: dict[int, Any] = {}
        rcv_enc: dict[int, Any] = {}
        history: list[tuple[Any, ...]] = []
        for item in items:
            status = item.message
            ts_enc[id(item)] = ts = dt(status.ts)
            rcv_enc[id(item)] = rcv = dt(item.received_at)
            assert isinstance(status, protocol.Status)
            key = _status_key(status)
            last = self._last_sample.get(status.site)
            changed = last is None or last[1] != key
            if (
                min_interval > 0
                and not changed
                and last is not None
                and (item.received_at - last[0]).total_seconds() < min_interval
            ):
                continue
            self._last_sample[status.site] = (item.received_at, key)
            history.append(
                (
                    status.msg_id,
                    status.site,
                    status.seq,
                    ts,
                    rcv,
                    stored_at,
                    status.state.value,
                    changed,
                    json.dumps(summarize_status(status), separators=(",", ":")),
                )
            )
        inserted = 0
        if history:
            inserted = self._many(conn, "history", history)
        # Latest status per site: the highest sequence number in this batch, applied only forwards.
        latest: dict[str, Received] = {}
        for item in items:
            cur = latest.get(item.message.site)
            if cur is None or item.message.seq > cur.message.seq:
                latest[item.message.site] = item
        site_rows: list[tuple[Any, ...]] = []
        for site in sorted(latest):  # a fixed lock order: no deadlocks between PostgreSQL replicas
            item = latest[site]
            status = item.message
            assert isinstance(status, protocol.Status)
            rcv = rcv_enc[id(item)]
            at = dt(min(item.received_at, status.ts)) if item.retained else rcv
            bundle = status.bundle
            site_rows.append(
                (
                    site,
                    rcv,
                    rcv,
                    at,
                    ts_enc[id(item)],
                    status.seq,
                    status.msg_id,
                    status.state.value,
                    status.state_reason,
                    status.install_state,
                    bundle.name if bundle else None,
                    bundle.version if bundle else None,
                    bundle.release if bundle else None,
                    status.agent_version,
                    status.interval_seconds,
                    item.raw.decode("utf-8") if item.raw else status.model_dump_json(by_alias=True),
                    False,
                    None,
                )
            )
        self._many(conn, "sites", site_rows)
        # Sites whose row may have changed (a refused old redelivery only causes a needless re-read).
        result.sites.update(latest)
        # A sample that was not new in history is a redelivery; one left out by downsampling counts as new.
        dupes = len(history) - inserted
        for item in items:
            status = item.message
            if dupes > 0 and not _is_newest(latest, item):
                dupes -= 1
                _bump(result.duplicates, status)
                continue
            _bump(result.stored, status)
            result.latencies.append((now - status.ts).total_seconds())
        while dupes > 0:  # only possible when the duplicates were the newest too: fix the counts
            dupes -= 1
            result.stored["status"] = result.stored.get("status", 0) - 1
            _bump(result.duplicates, items[0].message)
        # Snapshots reported in status: one row per distinct last_success.
        snaps = []
        for site, item in latest.items():
            status = item.message
            assert isinstance(status, protocol.Status)
            info = status.snapshot
            if info is None or info.last_success is None or self._last_snapshot.get(site) == info.last_success:
                continue
            self._last_snapshot[site] = info.last_success
            snaps.append(
                {
                    "site": site,
                    "taken_at": info.last_success,
                    "ok": True,
                    "size_bytes": info.size_bytes,
                    "revision": info.revision,
                    "detail": "",
                    "source": "status",
                    "received_at": item.received_at,
                }
            )
        if snaps:
            conn.execute(self._insert(SNAPSHOTS).on_conflict_do_nothing(), snaps)

    def _many(self, conn: Connection, what: Literal["history", "sites"], rows: list[tuple[Any, ...]]) -> int:
        """Run one of the hot-path statements for many rows; return the rows written.

        SQLite: the driver's executemany (in-process anyway). PostgreSQL: ``COPY`` into a per-session
        temporary staging table, then one ``INSERT … SELECT … ON CONFLICT`` (measured: about half the
        client CPU of psycopg's pipelined executemany, whose per-row Python overhead dominated, and
        less server work too). The staging table empties itself at commit and vanishes on rollback
        with the transaction, so a retried batch starts clean.
        """
        if self.dialect != "postgresql":
            return int(conn.exec_driver_sql(_SQLITE_SQL[what], rows).rowcount)
        create, copy, insert = _PG_STAGED[what]
        dbapi = conn.connection.driver_connection
        with dbapi.cursor() as cur:  # type: ignore[union-attr]
            cur.execute(create)
            with cur.copy(copy) as out:
                for row in rows:
                    out.write_row(row)
            cur.execute(insert)
            return int(cur.rowcount)

    def _write_events(
        self, conn: Connection, items: list[Received], *, result: BatchResult, touched: dict[str, datetime]
    ) -> None:
        rows = []
        for item in items:
            ev = item.message
            assert isinstance(ev, protocol.Event)
            rows.append(
                {
                    "msg_id": ev.msg_id,
                    "site": ev.site,
                    "seq": ev.seq,
                    "ts": ev.ts,
                    "received_at": item.received_at,
                    "type": ev.type,
                    "severity": ev.severity.value,
                    "summary": ev.summary,
                    "data": ev.data,
                }
            )
        table = EVENTS
        stmt = (
            self._insert(table)
            .on_conflict_do_nothing(index_elements=["msg_id"])
            .returning(table.c.id, table.c.msg_id, sort_by_parameter_order=True)
        )
        new_ids = {r.msg_id: r.id for r in conn.execute(stmt, rows)}
        snaps = []
        for item in items:
            ev = item.message
            assert isinstance(ev, protocol.Event)
            if ev.msg_id not in new_ids:
                _bump(result.duplicates, ev)
                continue
            _bump(result.stored, ev)
            result.events.append((ev.site, new_ids[ev.msg_id], ev.type))
            touched[ev.site] = max(item.received_at, touched.get(ev.site, item.received_at))
            if ev.type in ("snapshot.succeeded", "snapshot.failed"):
                snaps.append(_snapshot_from_event(ev, item.received_at))
        if snaps:
            conn.execute(self._insert(SNAPSHOTS).on_conflict_do_nothing(), snaps)

    def _write_replies(
        self,
        conn: Connection,
        items: list[Received],
        *,
        now: datetime,
        result: BatchResult,
        touched: dict[str, datetime],
    ) -> None:
        rows = []
        for item in items:
            rep = item.message
            assert isinstance(rep, protocol.Reply)
            rows.append(
                {
                    "msg_id": rep.msg_id,
                    "cmd_id": rep.cmd_id,
                    "site": rep.site,
                    "seq": rep.seq,
                    "ts": rep.ts,
                    "received_at": item.received_at,
                    "status": rep.status.value,
                    "detail": rep.detail,
                    "data": rep.data,
                }
            )
        table = REPLIES
        stmt = self._insert(table).on_conflict_do_nothing(index_elements=["msg_id"]).returning(table.c.msg_id)
        inserted = set(conn.execute(stmt, rows).scalars())
        cmds = COMMANDS
        for item in items:
            rep = item.message
            assert isinstance(rep, protocol.Reply)
            if rep.msg_id not in inserted:
                _bump(result.duplicates, rep)
                continue
            _bump(result.stored, rep)
            touched[rep.site] = max(item.received_at, touched.get(rep.site, item.received_at))
            rank = COMMAND_RANK[rep.status.value]
            lower = [s for s, r in COMMAND_RANK.items() if r < rank]
            # The site in the reply must own the command: a site cannot complete another site's command.
            upd = (
                sa.update(cmds)
                .where(cmds.c.cmd_id == rep.cmd_id, cmds.c.site == rep.site, cmds.c.state.in_(lower))
                .values(state=rep.status.value, detail=rep.detail, result=rep.data, updated_at=now)
            )
            if conn.execute(upd).rowcount:
                result.commands.add(rep.cmd_id)

    def _write_onlines(self, conn: Connection, items: list[Received], *, result: BatchResult) -> None:
        # Arrival order decides (the Last Will is built at connect time, so its ts and seq predate
        # later statuses and cannot be compared with them); the last online message in the batch wins.
        last: dict[str, Received] = {}
        for item in items:
            last[item.message.site] = item
            _bump(result.stored, item.message)
        table = SITES
        ins = self._insert(table)
        rows = []
        for site in sorted(last):
            item = last[site]
            msg = item.message
            assert isinstance(msg, protocol.Online)
            rows.append(
                {
                    "site": site,
                    "first_seen": item.received_at,
                    "last_seen": item.received_at,
                    "online": msg.online,
                    "online_at": item.received_at,
                    "stale": False,
                }
            )
        stmt = ins.on_conflict_do_update(
            index_elements=["site"],
            set_={"online": ins.excluded.online, "online_at": ins.excluded.online_at},
        )
        conn.execute(stmt, rows)
        result.sites.update(last)

    def _touch_sites(self, conn: Connection, touched: dict[str, datetime]) -> None:
        table = SITES
        ins = self._insert(table)
        rows = [{"site": s, "first_seen": t, "last_seen": t, "stale": False} for s, t in sorted(touched.items())]
        stmt = ins.on_conflict_do_update(
            index_elements=["site"],
            set_={"last_seen": ins.excluded.last_seen},
            where=ins.excluded.last_seen > table.c.last_seen,
        )
        conn.execute(stmt, rows)

    # ---- staleness ---------------------------------------------------------------------------

    def sweep_stale(self, *, factor: float, now: datetime | None = None) -> list[tuple[str, bool]]:
        """Mark sites stale (no status within factor x interval) or fresh again; return the changes."""
        now = now or utcnow()
        table = SITES
        changes: list[tuple[str, bool]] = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(table.c.site, table.c.status_at, table.c.interval_seconds, table.c.stale, table.c.last_seen)
            ).all()
            to_stale, to_fresh = [], []
            for r in rows:
                stale = is_stale(
                    status_at=r.status_at, interval=r.interval_seconds, last_seen=r.last_seen, factor=factor, now=now
                )
                if stale and not r.stale:
                    to_stale.append(r.site)
                elif not stale and r.stale:
                    to_fresh.append(r.site)
            for chunk in _chunks(to_stale, 500):
                conn.execute(
                    sa.update(table)
                    .where(table.c.site.in_(chunk), table.c.stale.is_(False))
                    .values(stale=True, stale_since=now)
                )
            for chunk in _chunks(to_fresh, 500):
                conn.execute(sa.update(table).where(table.c.site.in_(chunk)).values(stale=False, stale_since=None))
            changes = [(s, True) for s in to_stale] + [(s, False) for s in to_fresh]
        return changes

    def expire_commands(self, *, now: datetime | None = None) -> list[str]:
        """Commands past their expiry that never got a final reply become ``expired``."""
        now = now or utcnow()
        table = COMMANDS
        with self.engine.begin() as conn:
            ids = list(
                conn.execute(
                    sa.select(table.c.cmd_id).where(
                        table.c.expires < now, table.c.state.in_(["pending", "published", "accepted"])
                    )
                ).scalars()
            )
            for chunk in _chunks(ids, 500):
                conn.execute(
                    sa.update(table)
                    .where(table.c.cmd_id.in_(chunk), table.c.state.in_(["pending", "published", "accepted"]))
                    .values(state="expired", detail="no final reply before expiry", updated_at=now)
                )
        return ids

    # ---- retention ---------------------------------------------------------------------------

    def downsample_history(
        self, *, full_resolution: timedelta, bucket: timedelta, retention: timedelta, now: datetime | None = None
    ) -> int:
        """Thin status history older than ``full_resolution`` to one sample per site per bucket.

        State changes (``changed``) are always kept until ``retention``; everything older than
        ``retention`` goes. Returns the number of rows deleted. Works in bounded chunks so a large
        backlog does not hold one huge transaction.
        """
        now = now or utcnow()
        table = STATUS_HISTORY
        deleted = 0
        with self.engine.begin() as conn:
            deleted += conn.execute(sa.delete(table).where(table.c.received_at < now - retention)).rowcount
        cutoff = now - full_resolution
        bucket_s = bucket.total_seconds()
        last_id = 0
        while True:
            with self.engine.begin() as conn:
                rows = conn.execute(
                    sa.select(table.c.id, table.c.site, table.c.received_at, table.c.changed)
                    .where(table.c.received_at < cutoff, table.c.id > last_id)
                    .order_by(table.c.id)
                    .limit(5000)
                ).all()
                if not rows:
                    break
                last_id = rows[-1].id
                kept: set[tuple[str, int]] = set()
                # Buckets already represented by an earlier kept sample (from a previous sweep or chunk).
                doomed = []
                for r in rows:
                    b = (r.site, int(r.received_at.timestamp() // bucket_s))
                    if r.changed:
                        continue
                    if b in kept or self._bucket_taken(conn, table, r, bucket_s):
                        doomed.append(r.id)
                    else:
                        kept.add(b)
                for chunk in _chunks(doomed, 500):
                    deleted += conn.execute(sa.delete(table).where(table.c.id.in_(chunk))).rowcount
        return deleted

    @staticmethod
    def _bucket_taken(conn: Connection, table: sa.Table, row: Any, bucket_s: float) -> bool:
        start = datetime.fromtimestamp((row.received_at.timestamp() // bucket_s) * bucket_s, UTC)
        earlier = conn.execute(
            sa.select(table.c.id)
            .where(
                table.c.site == row.site,
                table.c.received_at >= start,
                table.c.id < row.id,
                table.c.changed.is_(False),
            )
            .limit(1)
        ).first()
        return earlier is not None

    # ---- commands ----------------------------------------------------------------------------

    def next_command_seq(self, conn: Connection, site: str) -> int:
        """Atomically take the next command sequence number for ``site`` (inside the caller's transaction)."""
        table = COMMAND_COUNTERS
        ins = self._insert(table).values(site=site, last_seq=1)
        stmt = ins.on_conflict_do_update(index_elements=["site"], set_={"last_seq": table.c.last_seq + 1}).returning(
            table.c.last_seq
        )
        return int(conn.execute(stmt).scalar_one())

    def set_command_state(
        self, cmd_id: str, *, state: str, detail: str = "", published_at: datetime | None = None
    ) -> bool:
        table = COMMANDS
        lower = [s for s, r in COMMAND_RANK.items() if r < COMMAND_RANK[state]]
        values: dict[str, Any] = {"state": state, "updated_at": utcnow()}
        if detail:
            values["detail"] = detail
        if published_at is not None:
            values["published_at"] = published_at
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    sa.update(table).where(table.c.cmd_id == cmd_id, table.c.state.in_(lower)).values(**values)
                ).rowcount
            )

    def pending_commands(
        self, *, min_age: timedelta = timedelta(0), now: datetime | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        now = now or utcnow()
        table = COMMANDS
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(table)
                .where(table.c.state == "pending", table.c.expires > now, table.c.updated_at <= now - min_age)
                .order_by(table.c.site, table.c.seq)
                .limit(limit)
            ).mappings()
            return [dict(r) for r in rows]

    # ---- replicas ----------------------------------------------------------------------------

    def replica_heartbeat(self, client_id: str, *, group: str, hostname: str, started: datetime) -> None:
        """Record that ``client_id`` is alive; a live replica is never adopted (``adopted_by`` cleared)."""
        now = utcnow()
        ins = self._insert(HUB_REPLICAS).values(
            client_id=client_id, shared_group=group, hostname=hostname, started_at=started, heartbeat_at=now
        )
        stmt = ins.on_conflict_do_update(
            index_elements=["client_id"],
            set_={"heartbeat_at": now, "adopted_by": None, "hostname": hostname, "started_at": started},
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def claim_dead_replicas(self, me: str, *, group: str, stale_before: datetime) -> list[str]:
        """Claim the sessions of replicas (same group) silent since ``stale_before`` and not already adopted
        by a live replica; return the ones ``me`` now holds (including those it held already)."""
        t = HUB_REPLICAS
        live = sa.select(t.c.client_id).where(t.c.heartbeat_at >= stale_before).scalar_subquery()
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(t)
                .where(
                    t.c.shared_group == group,
                    t.c.client_id != me,
                    t.c.heartbeat_at < stale_before,
                    sa.or_(t.c.adopted_by.is_(None), t.c.adopted_by == me, t.c.adopted_by.not_in(live)),
                )
                .values(adopted_by=me)
            )
            return list(
                conn.execute(
                    sa.select(t.c.client_id).where(t.c.adopted_by == me, t.c.heartbeat_at < stale_before)
                ).scalars()
            )

    def replica_adopted_by(self, client_id: str, *, stale_before: datetime) -> str | None:
        """Who holds ``client_id``'s session: None once the replica is alive again (or unknown)."""
        t = HUB_REPLICAS
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.heartbeat_at, t.c.adopted_by).where(t.c.client_id == client_id)).first()
        if row is None or row.heartbeat_at >= stale_before:
            return None
        return str(row.adopted_by) if row.adopted_by else None

    # ---- reads (API) -------------------------------------------------------------------------

    def list_sites(
        self,
        *,
        state: str | None = None,
        stale: bool | None = None,
        online: bool | None = None,
        prefix: str | None = None,
        bundle_version: str | None = None,
        sort: str = "site",
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        table = SITES
        cond = []
        if state is not None:
            cond.append(table.c.state == state)
        if stale is not None:
            cond.append(table.c.stale.is_(stale))
        if online is not None:
            cond.append(table.c.online.is_(online))
        if prefix:
            cond.append(table.c.site.startswith(prefix, autoescape=True))
        if bundle_version is not None:
            cond.append(table.c.bundle_version == bundle_version)
        desc = sort.startswith("-")
        column = table.c[sort.lstrip("-")]
        order = column.desc() if desc else column.asc()
        cols = [c for c in table.c if c.name != "status"]
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(table).where(*cond)).scalar_one()
            rows = conn.execute(
                sa.select(*cols).where(*cond).order_by(order, table.c.site).limit(limit).offset(offset)
            ).mappings()
            return int(total), [dict(r) for r in rows]

    def get_site(self, site: str) -> dict[str, Any] | None:
        table = SITES
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.site == site)).mappings().first()
        if row is None:
            return None
        out = dict(row)
        out["status"] = json.loads(out["status"]) if out["status"] else None
        return out

    def fleet_summary(self) -> dict[str, Any]:
        table = SITES
        with self.engine.connect() as conn:
            by_state = {
                (s or "unknown"): int(n)
                for s, n in conn.execute(sa.select(table.c.state, sa.func.count()).group_by(table.c.state))
            }
            stale = conn.execute(sa.select(sa.func.count()).where(table.c.stale.is_(True))).scalar_one()
            offline = conn.execute(sa.select(sa.func.count()).where(table.c.online.is_(False))).scalar_one()
        return {"sites": sum(by_state.values()), "by_state": by_state, "stale": int(stale), "offline": int(offline)}

    def history(
        self, site: str, *, since: datetime | None = None, until: datetime | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        table = STATUS_HISTORY
        cond = [table.c.site == site]
        if since is not None:
            cond.append(table.c.received_at >= since)
        if until is not None:
            cond.append(table.c.received_at < until)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(table).where(*cond).order_by(table.c.received_at.desc(), table.c.id.desc()).limit(limit)
            ).mappings()
            return [dict(r) for r in rows]

    def site_events(
        self, site: str, *, after_seq: int | None = None, limit: int = 100, order: Literal["asc", "desc"] = "asc"
    ) -> list[dict[str, Any]]:
        table = EVENTS
        cond = [table.c.site == site]
        if after_seq is not None:
            cond.append(table.c.seq > after_seq if order == "asc" else table.c.seq < after_seq)
        ordering = table.c.seq.asc() if order == "asc" else table.c.seq.desc()
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(table).where(*cond).order_by(ordering).limit(limit)).mappings()
            return [dict(r) for r in rows]

    def events(
        self,
        *,
        before_id: int | None = None,
        site: str | None = None,
        type_prefix: str | None = None,
        severity: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        table = EVENTS
        cond = []
        if before_id is not None:
            cond.append(table.c.id < before_id)
        if site is not None:
            cond.append(table.c.site == site)
        if type_prefix:
            cond.append(table.c.type.startswith(type_prefix, autoescape=True))
        if severity is not None:
            cond.append(table.c.severity == severity)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(table).where(*cond).order_by(table.c.id.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows]

    def snapshots(self, site: str, *, limit: int = 100) -> list[dict[str, Any]]:
        table = SNAPSHOTS
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(table).where(table.c.site == site).order_by(table.c.taken_at.desc()).limit(limit)
            ).mappings()
            return [dict(r) for r in rows]

    def commands(self, *, site: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        table = COMMANDS
        cond = [table.c.site == site] if site is not None else []
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(table).where(*cond).order_by(table.c.issued.desc(), table.c.seq.desc()).limit(limit)
            ).mappings()
            return [dict(r) for r in rows]

    def get_command(self, cmd_id: str) -> dict[str, Any] | None:
        table = COMMANDS
        replies = REPLIES
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.cmd_id == cmd_id)).mappings().first()
            if row is None:
                return None
            out = dict(row)
            out["replies"] = [
                dict(r)
                for r in conn.execute(
                    sa.select(replies).where(replies.c.cmd_id == cmd_id).order_by(replies.c.seq)
                ).mappings()
            ]
            return out

    # ---- bundles -----------------------------------------------------------------------------

    def add_bundle(self, row: dict[str, Any]) -> dict[str, Any]:
        table = BUNDLES
        with self.engine.begin() as conn:
            conn.execute(self._insert(table).on_conflict_do_nothing(index_elements=["sha256"]), row)
            got = conn.execute(sa.select(table).where(table.c.sha256 == row["sha256"])).mappings().one()
            return dict(got)

    def list_bundles(self, *, limit: int = 100) -> list[dict[str, Any]]:
        table = BUNDLES
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(table).order_by(table.c.id.desc()).limit(limit)).mappings()]

    def get_bundle(self, sha256: str) -> dict[str, Any] | None:
        table = BUNDLES
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.sha256 == sha256)).mappings().first()
            return dict(row) if row else None


_HISTORY_COLUMNS = "msg_id, site, seq, ts, received_at, stored_at, state, changed, summary"
_SITES_COLUMNS = (
    "site, first_seen, last_seen, status_at, status_ts, status_seq, status_msg_id, state, state_reason,"
    " install_state, bundle_name, bundle_version, bundle_release, agent_version, interval_seconds, status,"
    " stale, stale_since"
)
_SITES_UPDATE = ", ".join(
    f"{c} = excluded.{c}" for c in (x.strip() for x in _SITES_COLUMNS.split(",")) if c not in ("site", "first_seen")
)
_GRACE = int(SEQ_RESET_GRACE.total_seconds())
_SITES_WHERE = " WHERE sites.status_seq IS NULL OR excluded.status_seq > sites.status_seq"
# Built from module constants only (no input reaches the SQL text; values are bound parameters or COPY data).
_SQLITE_SQL = {
    "history": f"INSERT INTO status_history ({_HISTORY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
    " ON CONFLICT (msg_id) DO NOTHING",
    "sites": f"INSERT INTO sites ({_SITES_COLUMNS}) VALUES ({', '.join(['?'] * 18)})"  # noqa: S608
    f" ON CONFLICT (site) DO UPDATE SET {_SITES_UPDATE}{_SITES_WHERE}"
    f" OR julianday(excluded.status_ts) > julianday(sites.status_ts) + {_GRACE / 86400.0!r}",
}
#: PostgreSQL: (create the session's staging table if needed, COPY into it, move its rows into the real table).
#: Sites are moved in key order: a fixed lock order, so PostgreSQL replicas do not deadlock.
_PG_STAGED = {
    "history": (
        "CREATE TEMPORARY TABLE IF NOT EXISTS ingest_history ON COMMIT DELETE ROWS AS"  # noqa: S608
        f" SELECT {_HISTORY_COLUMNS} FROM status_history WITH NO DATA",
        f"COPY ingest_history ({_HISTORY_COLUMNS}) FROM STDIN",
        f"INSERT INTO status_history ({_HISTORY_COLUMNS}) SELECT {_HISTORY_COLUMNS} FROM ingest_history"  # noqa: S608
        " ON CONFLICT (msg_id) DO NOTHING",
    ),
    "sites": (
        "CREATE TEMPORARY TABLE IF NOT EXISTS ingest_sites ON COMMIT DELETE ROWS AS"  # noqa: S608
        f" SELECT {_SITES_COLUMNS} FROM sites WITH NO DATA",
        f"COPY ingest_sites ({_SITES_COLUMNS}) FROM STDIN",
        f"INSERT INTO sites ({_SITES_COLUMNS}) SELECT {_SITES_COLUMNS} FROM ingest_sites ORDER BY site"  # noqa: S608
        f" ON CONFLICT (site) DO UPDATE SET {_SITES_UPDATE}{_SITES_WHERE}"
        f" OR excluded.status_ts > sites.status_ts + interval '{_GRACE} seconds'",
    ),
}


def _pg_dt(value: datetime) -> datetime:
    return value


_ZERO = timedelta(0)


def _sqlite_dt(value: datetime) -> str:
    # The format SQLAlchemy's SQLite DateTime reads back (naive UTC, always with microseconds): the
    # first 26 characters of the UTC isoformat, without its "+00:00" (a hot path: no replace/astimezone
    # for the usual UTC value, whatever tzinfo object pydantic gave it).
    if value.utcoffset() != _ZERO:  # naive (taken as local time, as astimezone does) or another zone
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]


def _is_newest(latest: dict[str, Received], item: Received) -> bool:
    return latest[item.message.site] is item


def is_stale(
    *, status_at: datetime | None, interval: float | None, last_seen: datetime, factor: float, now: datetime
) -> bool:
    """No status within ``factor`` intervals. A site that never sent a status is judged from its
    first contact with the default 30 s interval, so it cannot hide by only sending events."""
    since = status_at or last_seen
    return (now - since).total_seconds() > factor * (interval or 30.0)


def _snapshot_from_event(ev: protocol.Event, received_at: datetime) -> dict[str, Any]:
    data = ev.data
    taken: datetime = ev.ts
    raw = data.get("taken_at") or data.get("last_success")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(raw)
            taken = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

    def _int(key: str) -> int | None:
        v = data.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    return {
        "site": ev.site,
        "taken_at": taken,
        "ok": ev.type == "snapshot.succeeded",
        "size_bytes": _int("size_bytes"),
        "revision": _int("revision"),
        "detail": ev.summary[:2000],
        "source": "event",
        "received_at": received_at,
    }


def _bump(counter: dict[str, int], msg: protocol.Message) -> None:
    kind = str(getattr(msg, "kind", "unknown"))
    counter[kind] = counter.get(kind, 0) + 1


def _days(delta: timedelta) -> float:
    return delta.total_seconds() / 86400.0


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def open_store(url: str, *, migrate: bool = True) -> Store:
    """Open (and by default migrate) the fleet store at ``url``."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa_event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a committed (and acknowledged) message survives power loss
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    else:
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    store = Store(engine)
    if migrate:
        store.migrate()
    return store
