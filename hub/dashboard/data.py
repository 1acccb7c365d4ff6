"""What the dashboard pages show, read from the fleet store in one call per page.

The REST API is shaped for machines (paging, one resource per call); a page wants one document
that is internally consistent, so these functions read the store directly. Values the agent
reported as ages (snapshot age) are recomputed against the hub's clock at read time: a status
that is an hour old must not claim a snapshot is 5 minutes old.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from hub.context import HubContext
from hub.models import REPLIES, SITES, STATUS_HISTORY
from hub.store import is_stale, utcnow

#: Display states; "stale" wins over the last reported state, "unknown" is a site without a status yet.
DISPLAY_STATES = ("green", "yellow", "red", "black", "stale", "unknown")
TIMELINE_WINDOW = timedelta(hours=24)
#: Most samples read for a timeline (consecutive equal states are merged before sending).
TIMELINE_MAX_SAMPLES = 20_000


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def status_doc(value: Any) -> dict[str, Any]:
    """The stored status document (JSON text in the store, or an already decoded dict)."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def snapshot_view(status: dict[str, Any] | None, *, now: datetime) -> dict[str, Any] | None:
    """The site's last etcd snapshot: age now, the limit its schedule allows, and whether it is overdue.

    ``overdue`` needs ``max_age_seconds`` from the agent (derived from its schedule); a site that
    reports snapshots but never succeeded is overdue too, a site that reports nothing is ``None``.
    """
    snap = (status or {}).get("snapshot")
    if not isinstance(snap, dict):
        return None
    last = _parse_time(snap.get("last_success"))
    max_age = snap.get("max_age_seconds")
    age = (now - last).total_seconds() if last else None
    overdue = (age is None) or (isinstance(max_age, int | float) and age > max_age)
    return {
        "last_success": _iso(last),
        "age_seconds": age,
        "max_age_seconds": max_age,
        "schedule": snap.get("schedule"),
        "failures": snap.get("failures") or 0,
        "overdue": bool(overdue),
    }


def site_view(ctx: HubContext, row: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    """One site as the overview shows it (``row`` is a ``sites`` row, with or without ``status``)."""
    stale = is_stale(
        status_at=row["status_at"],
        interval=row["interval_seconds"],
        last_seen=row["last_seen"],
        factor=ctx.config.staleness_factor,
        now=now,
    )
    state = row["state"]
    status = status_doc(row.get("status"))
    nodes = status.get("nodes") or []
    components = status.get("components") or []
    return {
        "site": row["site"],
        "state": state,
        "display": "stale" if stale else (state or "unknown"),
        "stale": stale,
        "state_reason": row["state_reason"] or "",
        "online": row["online"],
        "bundle": f"{row['bundle_name']}-{row['bundle_version']}" if row["bundle_version"] else None,
        "bundle_version": row["bundle_version"],
        "bundle_release": row["bundle_release"],
        "install_state": row["install_state"],
        "agent_version": row["agent_version"],
        "interval_seconds": row["interval_seconds"],
        "last_seen": _iso(row["last_seen"]),
        "status_at": _iso(row["status_at"]),
        "first_seen": _iso(row["first_seen"]),
        "nodes": len(nodes),
        "nodes_ready": sum(1 for n in nodes if isinstance(n, dict) and n.get("ready")),
        "components": len(components),
        "unhealthy": sum(1 for c in components if isinstance(c, dict) and not c.get("healthy")),
        "scaled_down": len(status.get("scaled_down") or []),
        "snapshot": snapshot_view(status, now=now),
    }


def overview(ctx: HubContext) -> dict[str, Any]:
    """Every site plus counts per display state. Sorting and filtering happen in the page."""
    now = utcnow()
    with ctx.store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(SITES).order_by(SITES.c.site)).mappings()]
    sites = [site_view(ctx, r, now=now) for r in rows]
    counts = dict.fromkeys(DISPLAY_STATES, 0)
    for s in sites:
        counts[s["display"]] += 1
    return {"now": _iso(now), "total": len(sites), "counts": counts, "sites": sites}


#: A Red/Black agent reports less often (limp home: ``link.limp_status_interval_seconds``, 120 s by default).
LIMP_INTERVAL_SECONDS = 120.0


def state_runs(
    samples: Iterable[tuple[datetime, str]], *, now: datetime, interval: float, factor: float
) -> list[dict[str, Any]]:
    """Consecutive samples of one state merged into runs; a gap longer than the staleness limit
    (``factor`` x the report interval, which is longer while Red/Black) becomes a ``stale`` run, as
    does the time since the last sample when that is too long."""

    def limit(state: str) -> float:
        return factor * (max(interval, LIMP_INTERVAL_SECONDS) if state in ("red", "black") else interval)

    runs: list[dict[str, Any]] = []
    prev: tuple[datetime, str] | None = None
    for at, state in samples:
        if prev is not None and (at - prev[0]).total_seconds() > limit(prev[1]):
            runs.append({"at": _iso(prev[0] + timedelta(seconds=limit(prev[1]))), "state": "stale"})
        if not runs or runs[-1]["state"] != state:
            runs.append({"at": _iso(at), "state": state})
        prev = (at, state)
    if prev is not None and (now - prev[0]).total_seconds() > limit(prev[1]):
        runs.append({"at": _iso(prev[0] + timedelta(seconds=limit(prev[1]))), "state": "stale"})
    return runs


def timeline(
    ctx: HubContext, site: str, *, now: datetime, interval: float, window: timedelta = TIMELINE_WINDOW
) -> dict[str, Any]:
    """State runs of ``site`` within ``window`` (starting with the state it was in when the window began)."""
    since = now - window
    table = STATUS_HISTORY
    with ctx.store.engine.connect() as conn:
        before = conn.execute(
            sa.select(table.c.received_at, table.c.state)
            .where(table.c.site == site, table.c.received_at < since)
            .order_by(table.c.received_at.desc(), table.c.id.desc())
            .limit(1)
        ).first()
        rows = conn.execute(
            sa.select(table.c.received_at, table.c.state)
            .where(table.c.site == site, table.c.received_at >= since)
            .order_by(table.c.received_at, table.c.id)
            .limit(TIMELINE_MAX_SAMPLES)
        ).all()
    samples: list[tuple[datetime, str]] = []
    if before is not None:
        # Older history is downsampled (one sample per bucket): no gap judgement across the window edge.
        samples.append((max(before.received_at, since), before.state))
    samples.extend((r.received_at, r.state) for r in rows)
    start = samples[0][0] if samples else now
    runs = state_runs(samples, now=now, interval=interval, factor=ctx.config.staleness_factor)
    return {"start": _iso(start), "end": _iso(now), "runs": runs}


def components_by_layer(status: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Components grouped by layer 0-4 (every layer present, possibly empty), sorted by tier then name."""
    layers: dict[int, list[dict[str, Any]]] = {layer: [] for layer in range(5)}
    for comp in (status or {}).get("components") or []:
        if isinstance(comp, dict) and comp.get("layer") in layers:
            layers[comp["layer"]].append(comp)
    return [
        {
            "layer": layer,
            "components": sorted(comps, key=lambda c: (c.get("tier", 9), c.get("name", ""))),
            "healthy": sum(1 for c in comps if c.get("healthy")),
        }
        for layer, comps in layers.items()
    ]


def dedupe_snapshots(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per snapshot: the store records a snapshot both from its event and from the next
    status (``last_success``); the event's row is kept when both exist (it says more)."""
    out: dict[tuple[str, bool], dict[str, Any]] = {}
    for r in rows:
        taken: datetime = r["taken_at"]
        key = (taken.replace(microsecond=0).isoformat(), bool(r["ok"]))
        if key in out and out[key]["source"] == "event":
            continue
        out[key] = {
            "taken_at": _iso(taken),
            "ok": r["ok"],
            "size_bytes": r["size_bytes"],
            "revision": r["revision"],
            "detail": r["detail"],
            "source": r["source"],
        }
    return sorted(out.values(), key=lambda x: x["taken_at"] or "", reverse=True)


def _commands_with_replies(ctx: HubContext, site: str, *, limit: int) -> list[dict[str, Any]]:
    cmds = ctx.store.commands(site=site, limit=limit)
    ids = [c["cmd_id"] for c in cmds]
    replies: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if ids:
        with ctx.store.engine.connect() as conn:
            for r in conn.execute(
                sa.select(REPLIES).where(REPLIES.c.cmd_id.in_(ids)).order_by(REPLIES.c.seq)
            ).mappings():
                replies[r["cmd_id"]].append(
                    {
                        "status": r["status"],
                        "detail": r["detail"],
                        "ts": _iso(r["ts"]),
                        "received_at": _iso(r["received_at"]),
                        "data": r["data"],
                    }
                )
    out = []
    for c in cmds:
        out.append(
            {
                "cmd_id": c["cmd_id"],
                "seq": c["seq"],
                "name": c["name"],
                "args": c["args"],
                "state": c["state"],
                "detail": c["detail"],
                "issued": _iso(c["issued"]),
                "expires": _iso(c["expires"]),
                "published_at": _iso(c["published_at"]),
                "updated_at": _iso(c["updated_at"]),
                "replies": replies[c["cmd_id"]],
            }
        )
    return out


def site_page(ctx: HubContext, site: str, *, events: int = 50, commands: int = 20) -> dict[str, Any] | None:
    """Everything the site page shows, or None for a site that never reported."""
    row = ctx.store.get_site(site)
    if row is None:
        return None
    now = utcnow()
    status = status_doc(row.get("status"))
    return {
        "now": _iso(now),
        "site": site_view(ctx, row, now=now),
        "layers": components_by_layer(status),
        "nodes": status.get("nodes") or [],
        "scaled_down": status.get("scaled_down") or [],
        "timeline": timeline(ctx, site, now=now, interval=row["interval_seconds"] or 30.0),
        "events": [
            {
                "id": e["id"],
                "seq": e["seq"],
                "ts": _iso(e["ts"]),
                "type": e["type"],
                "severity": e["severity"],
                "summary": e["summary"],
            }
            for e in ctx.store.site_events(site, order="desc", limit=events)
        ],
        "snapshots": dedupe_snapshots(ctx.store.snapshots(site, limit=40))[:20],
        "commands": _commands_with_replies(ctx, site, limit=commands),
        "bundles": [
            {"sha256": b["sha256"], "name": b["name"], "version": b["version"], "release": b["release"]}
            for b in ctx.store.list_bundles(limit=20)
        ],
    }
