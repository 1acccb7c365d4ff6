"""``edgefleet-agent status``: the site's state for an operator standing at the node.

It reads the state database directly, read-only (SQLite ``mode=ro``), so it works whether or not
the daemon runs, never blocks it (WAL readers do not block the writer) and cannot change
anything. Every part is optional: a fresh node with no database, a node that never installed a
bundle, or a database from an older agent whose tables lack a module all print what is known and
say what is not. ``--json`` prints the same as one JSON document for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import config as agent_config
from agent import exitcodes, placement, sitestatus
from agent.state import DB_NAME

#: Written by the daemon (agent/daemon.py STATE_KEY); duplicated to keep this command light.
DAEMON_KEY = "daemon.state"
INSTALL_CURRENT_KEY = "install.current"
LINK_KEY = "link.state"
LINK_LAST_PUBLISH_KEY = "link.last_publish"
#: The installer's rendered cache (agent/install/cache.py cache_dir), read as plain JSON.
RENDERED_DIR = "rendered"
SPEC_FILE = "spec.json"
RECENT_EVENTS = 10


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5)
    db.row_factory = sqlite3.Row
    return db


def _kv(db: sqlite3.Connection, key: str) -> Any:
    try:
        row = db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
    except sqlite3.OperationalError:
        return None
    if row is None:
        return None
    try:
        return json.loads(row["value"])
    except ValueError:
        return None


def _rows(db: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Rows of a query against a module's table; [] if that module never created it."""
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []


def _pid_alive(pid: Any) -> bool | None:
    """Whether the daemon that wrote the state still runs (a reused pid after a reboot does not count)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # alive, but we may not look (hidepid): trust the pid
    return b"edgefleet" in cmdline or b"agent.cli" in cmdline


def placement_record(state_dir: Path, bundle_id: Any) -> dict[str, Any] | None:
    """What the install-time tier policy changed in the installed bundle, from its rendered cache.

    The cache's ``spec.json`` is small (object keys and change codes, no objects), so this stays
    cheap. None without an installed bundle; ``recorded: false`` when the cache is gone or was
    written by an agent that did not record placement (the next install renders it again).
    """
    if not isinstance(bundle_id, str) or not bundle_id:
        return None
    out: dict[str, Any] = {"bundle_id": bundle_id, "recorded": False, "by_tier": {}, "objects": []}
    try:
        doc = json.loads((state_dir / RENDERED_DIR / bundle_id / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    units = [u for u in doc.get("units") or [] if isinstance(u, dict)]
    if not units or not all(isinstance(u.get("placement"), dict) for u in units):
        return out
    patched = [
        (int(u.get("tier") or 0), str(key), str(u.get("name")), placement.read_changes(codes))
        for u in units for key, codes in sorted(u["placement"].items())
    ]  # fmt: skip
    counts = placement.tier_counts((tier, codes) for tier, _, _, codes in patched)
    objects = [{"tier": tier, "key": key, "component": comp, "changes": list(codes)}
               for tier, key, comp, codes in patched]
    out.update(recorded=True, by_tier={str(t): c for t, c in counts.items()},
               objects=sorted(objects, key=lambda o: (o["tier"], o["key"])))
    return out


def collect(state_dir: Path, *, now: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (missing parts are None or empty)."""
    now = time.time() if now is None else now
    path = state_dir / DB_NAME
    report: dict[str, Any] = {"state_db": str(path), "initialized": path.is_file()}
    if not path.is_file():
        return report
    db = _connect(path)
    try:
        parts = {
            "install": _kv(db, sitestatus.INSTALL_KEY) or {},
            "degradation": _kv(db, sitestatus.DEGRADATION_KEY) or {},
            "snapshot": _kv(db, sitestatus.SNAPSHOT_KEY),
        }
        install, degradation, snapshot = parts["install"], parts["degradation"], parts["snapshot"]

        # Recorded by the intake each time it loads the root (status itself stays free of crypto).
        report["trust"] = _kv(db, sitestatus.TRUST_KEY)

        daemon = _kv(db, DAEMON_KEY) or {}
        if daemon:
            daemon = {**daemon, "running": _pid_alive(daemon.get("pid")) and not daemon.get("stopping")}
        report["daemon"] = daemon or None

        report["site_state"] = {
            "state": degradation.get("state", "unknown" if not degradation else "green"),
            "reason": degradation.get("reason", ""),
            "cause": degradation.get("cause", ""),
            "nodes": degradation.get("nodes", []),
            "scaled_down": degradation.get("scaled_down", []),
        }

        bad = [
            {"bundle": r["bundle"], "reason": r["reason"], "since": r["ts"]}
            for r in _rows(db, "SELECT bundle, reason, ts FROM install_bad ORDER BY ts")
        ]
        last_good = None
        current_id = _kv(db, INSTALL_CURRENT_KEY)
        if current_id:
            for r in _rows(db, "SELECT name, version, release FROM install_bundles WHERE bundle_id=?", (current_id,)):
                last_good = {"name": r["name"], "version": r["version"], "release": r["release"]}
        runs = _rows(db, "SELECT id, bundle, state, error, updated FROM install_runs ORDER BY id DESC LIMIT 1")
        last_run = dict(runs[0]) if runs else None
        report["placement"] = placement_record(state_dir, current_id)
        report["install"] = {
            "bundle": install.get("bundle"),
            "install_state": install.get("install_state", "idle"),
            "last_good": last_good,
            "bad_versions": bad,
            "last_run": last_run,
        }

        layers: dict[str, list[dict[str, Any]]] = {}
        for comp in install.get("components") or []:
            if isinstance(comp, dict):
                layers.setdefault(str(comp.get("layer", "?")), []).append(comp)
        report["layers"] = {
            layer: {
                "healthy": all(c.get("healthy") for c in comps),
                "components": sorted(comps, key=lambda c: (c.get("tier", 9), str(c.get("name")))),
            }
            for layer, comps in sorted(layers.items())
        }

        if snapshot:
            last = sitestatus.timestamp(snapshot.get("last_success"))
            report["snapshot"] = {**snapshot, "age_seconds": None if last is None else max(0.0, now - last)}
        else:
            report["snapshot"] = None

        depth = {r["channel"]: r["n"] for r in _rows(db, "SELECT channel, COUNT(*) AS n FROM outbox GROUP BY channel")}
        oldest = _rows(db, "SELECT MIN(created) AS t FROM outbox")
        oldest_t = oldest[0]["t"] if oldest else None
        link = _kv(db, LINK_KEY) or {}
        report["outbox"] = {
            "depth": sum(depth.values()),
            "by_channel": depth,
            "oldest_age_seconds": None if oldest_t is None else max(0.0, now - float(oldest_t)),
            "last_publish": link.get("last_publish") or _kv(db, LINK_LAST_PUBLISH_KEY),
            "link": link or None,
        }

        # The local history (agent/events.py) keeps delivered events too; the outbox only unsent ones.
        sent_up_to = {r["seq"] for r in _rows(db, "SELECT seq FROM outbox WHERE channel='events'")}
        events = [
            {**dict(r), "delivered": r["seq"] not in sent_up_to}
            for r in _rows(
                db, "SELECT seq, ts, type, severity, summary FROM event_log ORDER BY seq DESC LIMIT ?",
                (RECENT_EVENTS,),
            )
        ]
        report["recent_events"] = events
    finally:
        db.close()
    return report


def human_age(seconds: float | None) -> str:
    """``3d4h``, ``2h5m``, ``7m12s``, ``42s``; ``unknown`` for None."""
    if seconds is None:
        return "unknown"
    total = int(seconds)
    for unit, size, sub_unit, sub in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if total >= size:
            major, minor = divmod(total, size)
            return f"{major}{unit}{minor // sub}{sub_unit}" if minor // sub else f"{major}{unit}"
    return f"{total}s"


def _placement_lines(record: dict[str, Any] | None, *, objects: bool) -> list[str]:
    if record is None:
        return []
    if not record.get("recorded"):
        return ["  placement: not recorded for this bundle (rendered by an older agent, or cache removed)"]
    tiers = record.get("by_tier") or {}
    if not tiers:
        return ["  placement: every workload already matched its tier policy (nothing patched)"]
    parts = []
    for tier, counts in tiers.items():
        codes = ", ".join(f"{code} {n}" for code, n in counts.items() if code != "objects")
        parts.append(f"tier {tier}: {counts['objects']} ({codes})")
    hint = "" if objects else " [--placement lists them]"
    lines = [f"  placement: workloads patched at install: {'; '.join(parts)}{hint}"]
    if objects:
        lines += [f"    tier {o['tier']} {o['key']} ({o['component']}): {', '.join(o['changes'])}"
                  for o in record.get("objects") or []]
    return lines


def render(report: dict[str, Any], *, site: str, placement_objects: bool = False) -> str:
    lines = [f"site {site}"]
    if not report.get("initialized"):
        lines.append(f"  no agent state yet ({report['state_db']} does not exist): fresh node, agent never ran")
        return "\n".join(lines) + "\n"
    daemon = report.get("daemon")
    if daemon:
        running = {True: "running", False: "not running", None: "unknown"}[daemon.get("running")]
        tasks = daemon.get("tasks") or {}
        crashed = [n for n, t in tasks.items() if not t.get("up") and not t.get("finished")]
        detail = f", tasks down: {', '.join(sorted(crashed))}" if crashed and daemon.get("running") else ""
        lines.append(f"  agent:     {running} (pid {daemon.get('pid')}){detail}")
    else:
        lines.append("  agent:     never started with this state directory")

    st = report["site_state"]
    cause = f"{st['cause']}: " if st.get("cause") and st["cause"] != "none" else ""
    reason = f" ({cause}{st['reason']})" if st.get("reason") else ""
    lines.append(f"  state:     {str(st['state']).upper()}{reason}")
    if st["nodes"]:
        nodes = ", ".join(
            f"{n.get('name')}{'*' if n.get('control_plane') else ''} {'ready' if n.get('ready') else 'NOT READY'}"
            for n in st["nodes"]
        )
        lines.append(f"  nodes:     {nodes}")

    inst = report["install"]
    bundle = inst.get("bundle")
    if bundle:
        lines.append(
            f"  bundle:    {bundle.get('name')} {bundle.get('version')} (release {bundle.get('release')}), "
            f"install {inst['install_state']}"
        )
    else:
        lines.append(f"  bundle:    none installed, install {inst['install_state']}")
    if inst.get("last_good"):
        good = inst["last_good"]
        lines.append(f"  last good: {good['name']} {good['version']} (release {good['release']})")
    run = inst.get("last_run")
    if run and run.get("error"):
        lines.append(f"  last run:  {run['bundle']} {run['state']}: {run['error']}")
    for bad in inst.get("bad_versions") or []:
        lines.append(f"  BAD:       {bad['bundle']}: {bad['reason']}")
    lines += _placement_lines(report.get("placement"), objects=placement_objects)

    layers = report.get("layers") or {}
    if layers:
        lines.append("  components:")
        for layer, info in layers.items():
            lines.append(f"    layer {layer}: {'healthy' if info['healthy'] else 'UNHEALTHY'}")
            for comp in info["components"]:
                flag = "ok " if comp.get("healthy") else "BAD"
                extra = " [scaled down]" if comp.get("degraded") else ""
                why = f" - {comp['reason']}" if comp.get("reason") and not comp.get("healthy") else ""
                lines.append(f"      {flag} {comp.get('name')} (tier {comp.get('tier')}){extra}{why}")
    else:
        lines.append("  components: none reported yet")

    if st["scaled_down"]:
        lines.append("  scaled down:")
        for w in st["scaled_down"]:
            why = f" - {w['reason']}" if w.get("reason") else ""
            lines.append(
                f"    {w.get('kind')} {w.get('namespace')}/{w.get('name')} tier {w.get('tier')}: "
                f"{w.get('replicas')}/{w.get('original_replicas')} replicas{why}"
            )

    lines.append(f"  trust:     {_trust_line(report.get('trust'))}")

    snap = report.get("snapshot")
    if snap and snap.get("last_success"):
        fails = f", {snap['failures']} failure(s) since" if snap.get("failures") else ""
        lines.append(f"  snapshot:  {snap['last_success']} ({human_age(snap.get('age_seconds'))} ago){fails}")
    elif snap:
        lines.append(f"  snapshot:  none succeeded yet ({snap.get('failures', 0)} failure(s))")
    else:
        lines.append("  snapshot:  none yet")

    box = report["outbox"]
    last = sitestatus.timestamp(box.get("last_publish"))
    published = "never" if last is None else f"{human_age(time.time() - last)} ago"
    oldest = f", oldest {human_age(box['oldest_age_seconds'])}" if box.get("oldest_age_seconds") is not None else ""
    lines.append(f"  outbox:    {box['depth']} message(s) waiting{oldest}; last publish {published}")

    events = report.get("recent_events") or []
    if events:
        lines.append("  recent events (newest first; * = not yet delivered to the hub):")
        for e in events:
            mark = " " if e.get("delivered") else "*"
            lines.append(
                f"   {mark}{e.get('ts')} {str(e.get('severity')).upper():7} {e.get('type')}: {e.get('summary')}"
            )
    else:
        lines.append("  events:    none yet")
    return "\n".join(lines) + "\n"


def _trust_line(trust: dict[str, Any] | None) -> str:
    """The bundle trust root as the intake last loaded it (seed + stored rotations)."""
    if not trust:
        return "root not loaded yet (no bundle verified with this state directory)"
    if not trust.get("version"):
        return f"REFUSED: {trust.get('error')}"
    rotations = trust.get("rotations") or 0
    line = f"root v{trust['version']} (seed v{trust.get('seed_version')} + {rotations} stored rotation(s)), " \
           f"expires {trust.get('expires')}"
    return f"{line}; REFUSED now: {trust['error']}" if trust.get("error") else line


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        config = agent_config.load(Path(args.config))
    except agent_config.ConfigError as exc:
        print(f"edgefleet-agent: config error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    try:
        report = collect(config.state_dir)
    except sqlite3.Error as exc:
        print(f"edgefleet-agent: cannot read {config.state_dir / DB_NAME}: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    report["site"] = config.site_id
    report["generated"] = datetime.now(UTC).isoformat()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        sys.stdout.write(render(report, site=config.site_id, placement_objects=args.placement))
    return exitcodes.OK


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("status", help="print this site's state (reads the state DB, read-only)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--placement", action="store_true",
                        help="list each workload the install-time tier policy patched, with its changes")
    parser.set_defaults(func=_cmd_status)
