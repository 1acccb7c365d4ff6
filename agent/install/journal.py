"""The persisted install state machine (Mender-like): runs, their journal, bad versions, bundles.

Every step of a run is journaled (``begin``) in its own committed transaction *before* it
touches the cluster, and journaled again (``done``) after it finished. A SIGKILL therefore
leaves one of three facts behind for each step: not started, started (maybe half-done), or
done. Steps are idempotent (server-side apply, delete-if-present), so "started" is simply
re-run on resume.

Run states and what a restart does with each::

    staged ─► applying ─► pruning ─► committing ─► committed
       │         │            │
       └─────────┴────────────┴──► failed ─► rolling-back ─► rolled-back

* ``staged``/``applying``/``pruning``: resume forward, unless the run was already resumed
  :data:`MAX_RESUMES` times (a crash loop caused by the install itself): then roll back.
* ``committing``: finish the commit (every commit step is idempotent).
* ``failed``/``rolling-back``: continue the rollback.
* ``committed``/``rolled-back``: terminal; the next queued run (if any) starts.

Failpoints (tests only): ``EDGEFLEET_FAILPOINT=<step>`` SIGKILLs the process right after the
step's ``begin`` was committed, ``<step>@done`` right after the step ran but before ``done``
was journaled. ``<step>`` may end in ``*`` to match a prefix.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from agent.install import model
from agent.state import StateStore

MAX_RESUMES = 3

MIGRATIONS = [
    """CREATE TABLE install_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        bundle_id TEXT NOT NULL,
        bundle TEXT NOT NULL,
        previous_id TEXT,
        state TEXT NOT NULL,
        position TEXT NOT NULL DEFAULT '',
        resumes INTEGER NOT NULL DEFAULT 0,
        error TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    )""",
    """CREATE TABLE install_journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER NOT NULL REFERENCES install_runs(id),
        step TEXT NOT NULL,
        phase TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        ts REAL NOT NULL
    )""",
    "CREATE INDEX install_journal_run ON install_journal(run_id, step)",
    """CREATE TABLE install_bundles (
        bundle_id TEXT PRIMARY KEY,
        bundle TEXT NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        release INTEGER NOT NULL,
        created TEXT NOT NULL,
        path TEXT NOT NULL,
        manifest TEXT NOT NULL,
        imported REAL NOT NULL
    )""",
    """CREATE TABLE install_bad (
        bundle TEXT PRIMARY KEY,
        bundle_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        ts REAL NOT NULL
    )""",
    """CREATE TABLE install_inventory (
        bundle_id TEXT NOT NULL,
        ref TEXT NOT NULL,
        component TEXT NOT NULL,
        PRIMARY KEY (bundle_id, ref)
    )""",
    # ref -> resourceVersion at which the live object was known to hold what the bundle sets
    # (see agent/install/drift.py); valid for the cluster in kv VERIFIED_CLUSTER_KEY only.
    "CREATE TABLE install_verified (ref TEXT PRIMARY KEY, rv TEXT NOT NULL)",
    # ... and its metadata.generation then (0: the kind has none), see drift.Supervisor.repair.
    "ALTER TABLE install_verified ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
]

ACTIVE_STATES = ("staged", "applying", "pruning", "committing", "failed", "rolling-back")
FORWARD_STATES = ("staged", "applying", "pruning")
TERMINAL_STATES = ("committed", "rolled-back", "superseded")

CURRENT_KEY = "install.current"  # bundle_id of the committed (running) bundle
VERIFIED_CLUSTER_KEY = "install.verified_cluster"  # kube-system's uid when install_verified was written
HIGHWATER_KEY = "install.highwater"  # {"release": int, "created": iso str} of the last commit


@dataclass(frozen=True)
class BundleRecord:
    bundle_id: str
    bundle: str  # "<name>-<version>", the label value
    name: str
    version: str
    release: int
    created: str
    path: str
    #: The verified manifest's JSON, so a resumed run never re-reads it from an unverified place.
    manifest: str


@dataclass(frozen=True)
class Run:
    id: int
    bundle_id: str
    bundle: str
    previous_id: str | None
    state: str
    position: str
    resumes: int
    error: str


def setup(store: StateStore) -> None:
    store.migrate("install", MIGRATIONS)


# --- bundles -----------------------------------------------------------------------------------


def record_bundle(store: StateStore, rec: BundleRecord) -> None:
    with store.transaction() as db:
        db.execute(
            "INSERT INTO install_bundles(bundle_id, bundle, name, version, release, created, path, manifest, imported) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(bundle_id) DO UPDATE SET path=excluded.path",
            (rec.bundle_id, rec.bundle, rec.name, rec.version, rec.release, rec.created, rec.path, rec.manifest,
             time.time()),
        )


def get_bundle(store: StateStore, bundle_id: str | None) -> BundleRecord | None:
    if not bundle_id:
        return None
    row = store.db.execute("SELECT * FROM install_bundles WHERE bundle_id=?", (bundle_id,)).fetchone()
    if row is None:
        return None
    return BundleRecord(
        bundle_id=row["bundle_id"],
        bundle=row["bundle"],
        name=row["name"],
        version=row["version"],
        release=int(row["release"]),
        created=row["created"],
        path=row["path"],
        manifest=row["manifest"],
    )


def all_bundles(store: StateStore) -> list[BundleRecord]:
    rows = store.db.execute("SELECT bundle_id FROM install_bundles ORDER BY imported").fetchall()
    return [rec for rec in (get_bundle(store, r["bundle_id"]) for r in rows) if rec is not None]


def forget_bundle(store: StateStore, bundle_id: str) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM install_inventory WHERE bundle_id=?", (bundle_id,))
        db.execute("DELETE FROM install_bundles WHERE bundle_id=?", (bundle_id,))


def current(store: StateStore) -> BundleRecord | None:
    return get_bundle(store, store.get(CURRENT_KEY))


def highwater(store: StateStore) -> tuple[int, str | None]:
    mark = store.get(HIGHWATER_KEY) or {}
    return int(mark.get("release", 0)), mark.get("created")


# --- bad versions ------------------------------------------------------------------------------


def mark_bad(store: StateStore, rec: BundleRecord, reason: str) -> None:
    with store.transaction() as db:
        db.execute(
            "INSERT INTO install_bad(bundle, bundle_id, reason, ts) VALUES(?, ?, ?, ?) "
            "ON CONFLICT(bundle) DO UPDATE SET bundle_id=excluded.bundle_id, reason=excluded.reason, ts=excluded.ts",
            (rec.bundle, rec.bundle_id, reason, time.time()),
        )


def bad_reason(store: StateStore, bundle: str) -> str | None:
    row = store.db.execute("SELECT reason FROM install_bad WHERE bundle=?", (bundle,)).fetchone()
    return None if row is None else str(row["reason"])


def clear_bad(store: StateStore, bundle: str) -> bool:
    with store.transaction() as db:
        return db.execute("DELETE FROM install_bad WHERE bundle=?", (bundle,)).rowcount > 0


def bad_versions(store: StateStore) -> dict[str, str]:
    return {r["bundle"]: r["reason"] for r in store.db.execute("SELECT bundle, reason FROM install_bad")}


# --- local inventory ---------------------------------------------------------------------------


def save_inventory(store: StateStore, bundle_id: str, refs: dict[str, str]) -> None:
    """``refs``: object key → component. Replaces the bundle's whole inventory."""
    with store.transaction() as db:
        db.execute("DELETE FROM install_inventory WHERE bundle_id=?", (bundle_id,))
        db.executemany(
            "INSERT INTO install_inventory(bundle_id, ref, component) VALUES(?, ?, ?)",
            [(bundle_id, ref, comp) for ref, comp in sorted(refs.items())],
        )


def load_inventory(store: StateStore, bundle_id: str | None) -> dict[str, str]:
    if not bundle_id:
        return {}
    rows = store.db.execute("SELECT ref, component FROM install_inventory WHERE bundle_id=?", (bundle_id,))
    return {r["ref"]: r["component"] for r in rows}


# --- runs --------------------------------------------------------------------------------------


def _run(row: Any) -> Run:
    return Run(
        id=int(row["id"]),
        bundle_id=row["bundle_id"],
        bundle=row["bundle"],
        previous_id=row["previous_id"],
        state=row["state"],
        position=row["position"],
        resumes=int(row["resumes"]),
        error=row["error"],
    )


def new_run(store: StateStore, rec: BundleRecord) -> Run:
    """Queue a run for ``rec``. Older queued (``staged``, not started) runs are superseded."""
    with store.transaction() as db:
        db.execute(
            "UPDATE install_runs SET state='superseded', updated=? WHERE state='staged' AND NOT EXISTS "
            "(SELECT 1 FROM install_journal j WHERE j.run_id=install_runs.id)",
            (time.time(),),
        )
        now = time.time()
        cur = db.execute(
            "INSERT INTO install_runs(bundle_id, bundle, previous_id, state, created, updated) "
            "VALUES(?, ?, NULL, 'staged', ?, ?)",
            (rec.bundle_id, rec.bundle, now, now),
        )
        run_id = int(cur.lastrowid or 0)
    run = get_run(store, run_id)
    assert run is not None
    return run


def get_run(store: StateStore, run_id: int) -> Run | None:
    row = store.db.execute("SELECT * FROM install_runs WHERE id=?", (run_id,)).fetchone()
    return None if row is None else _run(row)


def active_run(store: StateStore) -> Run | None:
    """The oldest run that is not terminal: the one the installer must work on next."""
    marks = ",".join("?" for _ in ACTIVE_STATES)
    row = store.db.execute(
        f"SELECT * FROM install_runs WHERE state IN ({marks}) ORDER BY id LIMIT 1",  # noqa: S608
        ACTIVE_STATES,
    ).fetchone()
    return None if row is None else _run(row)


def last_run(store: StateStore) -> Run | None:
    row = store.db.execute("SELECT * FROM install_runs ORDER BY id DESC LIMIT 1").fetchone()
    return None if row is None else _run(row)


def set_state(store: StateStore, run: Run, state: str, *, position: str = "", error: str | None = None) -> Run:
    with store.transaction() as db:
        db.execute(
            "UPDATE install_runs SET state=?, position=?, error=COALESCE(?, error), updated=? WHERE id=?",
            (state, position, error, time.time(), run.id),
        )
    new = get_run(store, run.id)
    assert new is not None
    return new


def start(store: StateStore, run: Run, *, previous_id: str | None) -> Run:
    """Pin the last good bundle on the run's first start (it is the rollback target)."""
    with store.transaction() as db:
        db.execute(
            "UPDATE install_runs SET previous_id=?, state='applying', updated=? WHERE id=?",
            (previous_id, time.time(), run.id),
        )
    new = get_run(store, run.id)
    assert new is not None
    return new


def count_resume(store: StateStore, run: Run) -> Run:
    with store.transaction() as db:
        db.execute("UPDATE install_runs SET resumes=resumes+1, updated=? WHERE id=?", (time.time(), run.id))
    new = get_run(store, run.id)
    assert new is not None
    return new


# --- journal -----------------------------------------------------------------------------------


def done_steps(store: StateStore, run_id: int) -> set[str]:
    rows = store.db.execute("SELECT step FROM install_journal WHERE run_id=? AND phase='done'", (run_id,))
    return {r["step"] for r in rows}


def entries(store: StateStore, run_id: int) -> list[dict[str, Any]]:
    rows = store.db.execute("SELECT step, phase, detail, ts FROM install_journal WHERE run_id=? ORDER BY id", (run_id,))
    return [dict(r) for r in rows]


def begin(store: StateStore, run: Run, step: str, detail: dict[str, Any] | None = None) -> None:
    with store.transaction() as db:
        db.execute(
            "INSERT INTO install_journal(run_id, step, phase, detail, ts) VALUES(?, ?, 'begin', ?, ?)",
            (run.id, step, json.dumps(detail or {}, sort_keys=True), time.time()),
        )
        db.execute("UPDATE install_runs SET position=?, updated=? WHERE id=?", (step, time.time(), run.id))
    failpoint(step)


def done(store: StateStore, run: Run, step: str, detail: dict[str, Any] | None = None) -> None:
    failpoint(step + "@done")
    with store.transaction() as db:
        db.execute(
            "INSERT INTO install_journal(run_id, step, phase, detail, ts) VALUES(?, ?, 'done', ?, ?)",
            (run.id, step, json.dumps(detail or {}, sort_keys=True), time.time()),
        )


def failed(store: StateStore, run: Run, step: str, error: str) -> None:
    with store.transaction() as db:
        db.execute(
            "INSERT INTO install_journal(run_id, step, phase, detail, ts) VALUES(?, ?, 'failed', ?, ?)",
            (run.id, step, json.dumps({"error": error}), time.time()),
        )


def failpoint(name: str) -> None:
    """SIGKILL ourselves at ``name`` when the test harness asks for it (see module docstring)."""
    wanted = os.environ.get("EDGEFLEET_FAILPOINT")
    if not wanted:
        return
    hit = name.startswith(wanted[:-1]) if wanted.endswith("*") else name == wanted
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


# --- verified resourceVersions (drift) ---------------------------------------------------------


def verified_versions(store: StateStore) -> dict[str, model.Seen]:
    return {row["ref"]: (row["rv"], int(row["generation"]))
            for row in store.db.execute("SELECT ref, rv, generation FROM install_verified")}


def save_verified(store: StateStore, versions: dict[str, model.Seen], *, replace: bool = False) -> None:
    """Record ref -> (resourceVersion, generation) (``replace``: they become the whole table)."""
    with store.transaction() as db:
        if replace:
            db.execute("DELETE FROM install_verified")
        db.executemany(
            "INSERT INTO install_verified(ref, rv, generation) VALUES(?, ?, ?) "
            "ON CONFLICT(ref) DO UPDATE SET rv=excluded.rv, generation=excluded.generation",
            [(ref, rv, generation) for ref, (rv, generation) in versions.items() if rv],
        )
