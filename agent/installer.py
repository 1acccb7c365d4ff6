"""The install engine: runs the persisted plan of a bundle, gates it, commits or rolls back.

One run per queued bundle (see :mod:`agent.install.journal` for the state machine and what a
restart does in each state). A run, forward::

    prepare        target inventory written (locally and in the cluster, state "pending"),
                   data-bearing objects that already existed noted, images loaded
    apply:<c>      per component, layers 0 → 4, the dependsOn DAG with bounded parallelism
    gate:<c>       the component's health gate (its own timeout)
    prune          objects of the last good bundle the target no longer has: deleted, except
                   Namespaces/CRDs/PVs/PVCs, which are *retained* (unlabelled) - deleting them
                   would delete data (every object in a namespace, every custom resource)
    commit         one transaction: current := target, last good := previous, high-water mark

and on failure (gate timeout, refused object, crash loop)::

    rollback:remove       objects only the failed bundle has, deleted (data-bearing ones too,
                          unless they existed before the run: they held nothing yet)
    rollback:apply:<c>    the last good bundle re-applied, component by component
    rollback:gate:<c>     its gates, best effort (reported, never blocks the rollback)
    rollback:finish       failed version marked bad, its inventory dropped

Only one process executes runs at a time (an ``flock`` on ``<state_dir>/install.lock``): the
daemon's task or ``edgefleet-agent install run``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from agent import exitcodes, images, kube, metrics, protocol, sitestatus
from agent.context import AgentContext
from agent.install import apply, cache, drift, gates, inventory, journal, model, render, source
from agent.state import StateStore

log = structlog.get_logger("edgefleet.install")

LOCK_NAME = "install.lock"
PREVIOUS_KEY = "install.previous"  # bundle_id of the last good bundle before the current one
POLL_SECONDS = 2.0


class InstallFailed(Exception):
    """The run cannot go forward; it rolls back."""


# --- spec cache --------------------------------------------------------------------------------

_specs: dict[str, model.Spec] = {}


async def spec_for(ctx: AgentContext, rec: journal.BundleRecord) -> model.Spec:
    """The rendered spec of a stored bundle (in memory: the current and the target, at most).

    Rendering happens once per bundle, in a child process (see :mod:`agent.install.cache`).
    """
    spec = _specs.get(rec.bundle_id)
    if spec is None:
        spec = await cache.ensure(Path(rec.path), cache.cache_dir(ctx.config.state_dir, rec.bundle_id),
                                  default_timeout=ctx.config.install.default_gate_timeout_seconds)
        while len(_specs) >= 2:
            _specs.pop(next(iter(_specs)))
        _specs[rec.bundle_id] = spec
    return spec


def keep_only_current_spec(ctx: AgentContext) -> None:
    """After a run, supervision needs the committed bundle's spec only: the one it replaced (or
    the failed target) is read again from its rendered cache should a later run need it."""
    cur = journal.current(ctx.store)
    for bundle_id in [b for b in _specs if cur is None or b != cur.bundle_id]:
        del _specs[bundle_id]


# --- locking -----------------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive(state_dir: Path, *, wait: bool = False, name: str = LOCK_NAME) -> Iterator[bool]:
    """Hold a lock file while the block runs; yields False if another process has it (and not ``wait``)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# --- the DAG runner ----------------------------------------------------------------------------


async def run_layer(units: list[model.Unit], fn: Callable[[model.Unit], Awaitable[None]], *, parallelism: int) -> None:
    """Run ``fn`` per unit, a unit only after its dependsOn (within the layer), ``parallelism`` at once.

    The first failure cancels the rest of the layer and is re-raised as itself (an API server
    that went away too: the caller waits it out, it must not arrive as an ExceptionGroup).
    """
    finished = {u.name: asyncio.Event() for u in units}
    sem = asyncio.Semaphore(parallelism)

    async def one(unit: model.Unit) -> None:
        for dep in unit.depends_on:
            if dep in finished:
                await finished[dep].wait()
        async with sem:
            await fn(unit)
        finished[unit.name].set()

    try:
        async with asyncio.TaskGroup() as group:
            for unit in units:
                group.create_task(one(unit))
    except* (InstallFailed, apply.ApplyFailed, gates.GateFailed, kube.KubeUnavailable) as eg:
        raise eg.exceptions[0] from None


# --- site.install ------------------------------------------------------------------------------


def publish(ctx: AgentContext, *, components: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Persist the installer's part of the site status (``site.install``, see agent/sitestatus.py)."""
    store = ctx.store
    old = store.get(sitestatus.INSTALL_KEY, {}) or {}
    cur = journal.current(store)
    run = journal.active_run(store)
    last = journal.last_run(store)
    value: dict[str, Any] = {
        "bundle": {"name": cur.name, "version": cur.version, "release": cur.release} if cur else None,
        "bundle_id": cur.bundle_id if cur else None,
        "install_state": run.state if run else "idle",
        "components": old.get("components", []) if components is None else components,
        "target": run.bundle if run else None,
        "position": run.position if run else "",
        "last_run": {"bundle": last.bundle, "state": last.state, "error": last.error} if last else None,
        "bad_versions": journal.bad_versions(store),
        "skipped": _skipped(cur) if cur else [],
    }
    comps = value["components"]
    layers: dict[str, bool] = {}
    for comp in comps:
        layers[str(comp["layer"])] = layers.get(str(comp["layer"]), True) and bool(comp["healthy"])
    value["layers"] = layers
    value["healthy"] = bool(cur) and all(layers.values())
    store.put(sitestatus.INSTALL_KEY, value)
    ctx.report_now.set()
    return value


_skipped_cache: dict[str, list[dict[str, Any]]] = {}


def _skipped(rec: journal.BundleRecord) -> list[dict[str, Any]]:
    if rec.bundle_id not in _skipped_cache:
        _skipped_cache.clear()
        _skipped_cache[rec.bundle_id] = source.skipped(rec.manifest)
    return _skipped_cache[rec.bundle_id]


def component_health(spec: model.Spec, results: dict[str, tuple[bool, str, bool]]) -> list[dict[str, Any]]:
    out = []
    for unit in sorted(spec.units, key=lambda u: (u.layer, u.name)):
        healthy, reason, degraded = results.get(unit.name, (False, "not checked yet", False))
        out.append(
            protocol.ComponentHealth(
                name=unit.name, layer=unit.layer, tier=unit.tier, healthy=healthy, reason=reason[:300],
                degraded=degraded,
            ).model_dump(mode="json")
        )
    return out


# --- one run -----------------------------------------------------------------------------------


class _Runner:
    def __init__(self, ctx: AgentContext, api: Any, run: journal.Run) -> None:
        self.ctx = ctx
        self.api = api
        self.run = run
        self.store = ctx.store
        self.done = journal.done_steps(ctx.store, run.id)
        self.results: dict[str, tuple[bool, str, bool]] = {}
        #: Components applying at once (``install.apply_parallelism``); gates are not limited by it.
        self.applying = asyncio.Semaphore(ctx.config.install.apply_parallelism)

    async def step(self, name: str, fn: Callable[[], Awaitable[dict[str, Any] | None]]) -> None:
        if name in self.done:
            return
        journal.begin(self.store, self.run, name)
        try:
            detail = await fn()
        except (apply.ApplyFailed, gates.GateFailed, InstallFailed) as exc:
            journal.failed(self.store, self.run, name, str(exc))
            raise
        journal.done(self.store, self.run, name, detail)
        self.done.add(name)

    def state(self, state: str, *, error: str | None = None) -> None:
        self.run = journal.set_state(self.store, self.run, state, position=self.run.position, error=error)
        metrics.INSTALL_STATE.clear()
        metrics.INSTALL_STATE.labels(state).set(1)
        publish(self.ctx)

    # forward ----------------------------------------------------------------------------------

    async def forward(self, spec: model.Spec, prev: model.Spec | None) -> None:
        refs = spec.refs()

        async def prepare() -> dict[str, Any]:
            prev_refs = journal.load_inventory(self.store, prev.bundle_id if prev else None)
            new_data = spec.heads(
                k for k in refs if k not in prev_refs and model.Ref.parse(k).kind in model.DATA_BEARING)
            preexisting = [key for key, obj in new_data if await apply.exists(self.api, model.stub(obj))]
            journal.save_inventory(self.store, spec.bundle_id, refs)
            await apply.retrying(lambda: inventory.write(self.api, spec, refs, state="pending"),
                                 what="inventory", deadline=time.monotonic())
            try:
                loaded = await images.load_for(self.ctx, spec)
            except images.ImageLoadError as exc:
                raise InstallFailed(str(exc)) from None
            return {"preexisting": preexisting, "objects": len(refs), "images": loaded}

        await self.step("prepare", prepare)
        parallelism = self.ctx.config.install.parallelism
        for layer in spec.layers():
            await run_layer(layer, lambda u: self._install_unit(u, prefix=""), parallelism=parallelism)
        if self.run.state != "pruning":
            self.state("pruning")

        async def prune() -> dict[str, Any]:
            if prev is None:
                return {"deleted": 0, "retained": []}
            gone = prev.stubs(k for k in prev.refs() if k not in refs)
            deleted, retained = 0, []
            for obj in apply.delete_order(gone):
                if obj["kind"] in model.DATA_BEARING:
                    await apply.retain_object(self.api, obj, bundle_label=prev.label)
                    retained.append(str(model.Ref.of(obj)))
                elif await apply.delete_object(self.api, obj):
                    deleted += 1
            if retained:
                self.ctx.emit("install.retained", f"{len(retained)} data-bearing objects of {prev.label} kept, "
                              "unlabelled: delete them by hand if no longer needed",
                              severity=protocol.Severity.WARNING, data={"objects": retained[:50]})
            return {"deleted": deleted, "retained": retained}

        await self.step("prune", prune)
        self.state("committing")

    async def _install_unit(self, unit: model.Unit, *, prefix: str) -> None:
        deadline = time.monotonic() + unit.gate_timeout
        step = f"{prefix}apply:{unit.name}"

        async def do_apply() -> dict[str, Any]:
            versions: dict[str, model.Seen] = {}
            count = await apply.apply_unit(self.api, unit, deadline=deadline, step=step, versions=versions)
            # An optimisation only (drift re-reads what is not recorded): never a reason to stop
            # the step, e.g. when the API server went away right after the last apply.
            with contextlib.suppress(kube.KubeError):
                await drift.save_verified(self.store, self.api, versions)
            return {"objects": count}

        async def do_gate() -> dict[str, Any]:
            await gates.wait(self.api, unit.gate_checks, timeout=max(1.0, deadline - time.monotonic()))
            return {}

        try:
            async with self.applying:
                await self.step(step, do_apply)
            await self.step(f"{prefix}gate:{unit.name}", do_gate)
        except (apply.ApplyFailed, gates.GateFailed) as exc:
            self.results[unit.name] = (False, str(exc), False)
            raise InstallFailed(f"component {unit.name}: {exc}") from None
        self.results[unit.name] = (True, "", False)

    async def commit(self, spec: model.Spec) -> None:
        if "commit" in self.done:
            return
        journal.begin(self.store, self.run, "commit")
        await apply.retrying(lambda: inventory.write(self.api, spec, spec.refs(), state="committed"),
                             what="inventory", deadline=time.monotonic())
        journal.failpoint("commit@done")
        with self.store.transaction():
            journal.done(self.store, self.run, "commit")
            if self.run.previous_id != spec.bundle_id:
                self.store.put(PREVIOUS_KEY, self.run.previous_id)
            self.store.put(journal.CURRENT_KEY, spec.bundle_id)
            release, _ = journal.highwater(self.store)
            if spec.release >= release:
                self.store.put(journal.HIGHWATER_KEY, {"release": spec.release, "created": spec.created})
            self.run = journal.set_state(self.store, self.run, "committed", position="commit")
        self.done.add("commit")

    # rollback ---------------------------------------------------------------------------------

    async def rollback(self, spec: model.Spec | None, prev: model.Spec | None) -> None:
        if self.run.state != "rolling-back":
            self.state("rolling-back")
        prepared: dict[str, Any] = next((json.loads(e["detail"]) for e in journal.entries(self.store, self.run.id)
                         if e["step"] == "prepare" and e["phase"] == "done"), {})
        keep = set(prepared.get("preexisting", []))

        async def remove() -> dict[str, Any]:
            if spec is None:
                return {"deleted": 0}
            prev_keys = set(prev.refs()) if prev else set()
            doomed = spec.stubs(k for k in spec.refs() if k not in prev_keys and k not in keep)
            deleted = 0
            by_order: dict[int, list[dict[str, Any]]] = {}
            for obj in doomed:
                by_order.setdefault(render.order_key(obj), []).append(obj)

            async def one(obj: dict[str, Any]) -> None:
                nonlocal deleted
                if await apply.delete_object(self.api, obj):
                    deleted += 1

            for order in sorted(by_order, reverse=True):
                await apply.gather_bounded(by_order[order], one, limit=apply.OBJECT_CONCURRENCY)
            return {"deleted": deleted}

        await self.step("rollback:remove", remove)
        unhealthy: list[str] = []
        if prev is not None:
            for layer in prev.layers():
                await run_layer(layer, lambda u: self._restore_unit(u, unhealthy),
                                parallelism=self.ctx.config.install.parallelism)

        async def finish() -> dict[str, Any]:
            if spec is not None:
                await apply.retrying(lambda: inventory.remove(self.api, bundle_name=spec.name, release=spec.release),
                                     what="inventory", deadline=time.monotonic())
            return {"unhealthy": unhealthy}

        await self.step("rollback:finish", finish)
        rec = journal.get_bundle(self.store, self.run.bundle_id)
        with self.store.transaction():
            if rec is not None and (prev is None or prev.bundle_id != rec.bundle_id):
                journal.mark_bad(self.store, rec, self.run.error or "install failed")
            if prev is None or prev.bundle_id != self.run.bundle_id:
                journal.save_inventory(self.store, self.run.bundle_id, {})
            self.run = journal.set_state(self.store, self.run, "rolled-back", position="rollback:finish")

    async def _restore_unit(self, unit: model.Unit, unhealthy: list[str]) -> None:
        deadline = time.monotonic() + unit.gate_timeout

        async def do_apply() -> dict[str, Any]:
            # Best effort, like the gates below: the last good bundle applied cleanly before, and
            # a rollback that stops half-way would leave the mix it exists to prevent.
            try:
                count = await apply.apply_unit(self.api, unit, deadline=deadline, step=f"rollback:apply:{unit.name}")
            except apply.ApplyFailed as exc:
                unhealthy.append(unit.name)
                return {"error": str(exc)}
            return {"objects": count}

        async def do_gate() -> dict[str, Any]:
            try:
                await gates.wait(self.api, unit.gate_checks, timeout=max(1.0, deadline - time.monotonic()))
            except gates.GateFailed as exc:
                unhealthy.append(unit.name)
                return {"unhealthy": str(exc)}
            return {}

        await self.step(f"rollback:apply:{unit.name}", do_apply)
        await self.step(f"rollback:gate:{unit.name}", do_gate)


def _staged(rec: journal.BundleRecord | None) -> bool:
    """The bundle is still in the store (an operator may have wiped it; then it cannot be used)."""
    return rec is not None and Path(rec.path).is_dir()


async def execute(ctx: AgentContext, api: Any, run: journal.Run) -> journal.Run:
    """Drive ``run`` to a terminal state (or raise KubeUnavailable-style errors to retry later)."""
    store = ctx.store
    runner = _Runner(ctx, api, run)
    rec = journal.get_bundle(store, run.bundle_id)
    started = bool(journal.entries(store, run.id)) or run.state != "staged"
    spec: model.Spec | None = None
    try:
        if rec is None or not _staged(rec):
            raise InstallFailed(f"bundle {run.bundle} is no longer in the store")
        spec = await spec_for(ctx, rec)
    except (InstallFailed, cache.RenderError, ValueError, OSError) as exc:
        error = f"cannot plan {run.bundle}: {exc}"
        if not started:
            with store.transaction():
                if rec is not None:
                    journal.mark_bad(store, rec, error)
                runner.run = journal.set_state(store, run, "rolled-back", error=error)
            ctx.emit("install.failed", error, severity=protocol.Severity.ERROR, data={"bundle": run.bundle})
            metrics.INSTALLS.labels("failed").inc()
            publish(ctx)
            return runner.run
        runner.state("failed", error=error)
    t0 = time.monotonic()
    if runner.run.state == "staged":
        current = store.get(journal.CURRENT_KEY)
        runner.run = journal.start(store, runner.run, previous_id=current)
        runner.state("applying")
        from_rec = journal.get_bundle(store, current)
        ctx.emit("install.started", f"installing {run.bundle}",
                 data={"bundle": run.bundle, "from": from_rec.bundle if from_rec else None})
    elif runner.run.state in journal.FORWARD_STATES:
        runner.run = journal.count_resume(store, runner.run)
        if runner.run.resumes > journal.MAX_RESUMES:
            runner.state("failed", error=f"interrupted {runner.run.resumes} times: rolling back (crash loop)")
        else:
            ctx.emit("install.resumed", f"resuming {run.bundle} at {runner.run.position or 'start'}",
                     data={"bundle": run.bundle, "position": runner.run.position, "resumes": runner.run.resumes})
    prev_rec = journal.get_bundle(store, runner.run.previous_id)
    prev = await spec_for(ctx, prev_rec) if prev_rec is not None and _staged(prev_rec) else None
    # Re-installing the current bundle: nothing to prune; going back means re-applying it.
    same = prev is not None and spec is not None and prev.bundle_id == spec.bundle_id
    if runner.run.state in journal.FORWARD_STATES and spec is not None:
        try:
            await runner.forward(spec, None if same else prev)
        except (InstallFailed, apply.ApplyFailed, gates.GateFailed) as exc:
            runner.state("failed", error=str(exc))
            ctx.emit("install.failed", f"{run.bundle} failed: {exc}; rolling back",
                     severity=protocol.Severity.ERROR, data={"bundle": run.bundle, "error": str(exc)})
    if runner.run.state == "committing" and spec is not None:
        await runner.commit(spec)
        prune_store(ctx)
        await images.collect_garbage(ctx, keep={store.get(journal.CURRENT_KEY), store.get(PREVIOUS_KEY)})
        await apply.retrying(lambda: _gc_cluster(ctx, api), what="inventory gc", deadline=time.monotonic())
        metrics.INSTALLS.labels("committed").inc()
        metrics.INSTALL_SECONDS.observe(time.monotonic() - t0)
        ctx.emit("install.committed", f"{run.bundle} installed and healthy", data={"bundle": run.bundle})
        publish(ctx, components=component_health(spec, {u.name: (True, "", False) for u in spec.units}))
    if runner.run.state in ("failed", "rolling-back"):
        await runner.rollback(spec, prev)
        prune_store(ctx)
        metrics.INSTALLS.labels("rolled-back").inc()
        metrics.ROLLBACKS.inc()
        target = prev.label if prev else "no bundle (the site is as before the first install)"
        ctx.emit("install.rolled_back", f"{run.bundle} rolled back to {target}; version marked bad",
                 severity=protocol.Severity.ERROR,
                 data={"bundle": run.bundle, "to": prev.label if prev else None, "error": runner.run.error})
        publish(ctx, components=component_health(prev, {}) if prev else [])
    publish(ctx)
    return runner.run


def prune_store(ctx: AgentContext) -> None:
    """Keep the current and the last good bundle (and any still queued) in the store; drop the rest."""
    store = ctx.store
    keep = {store.get(journal.CURRENT_KEY), store.get(PREVIOUS_KEY)}
    active = journal.active_run(store)
    queued = {r["bundle_id"] for r in store.db.execute("SELECT bundle_id FROM install_runs WHERE state='staged'")}
    keep |= queued | ({active.bundle_id, active.previous_id} if active else set())
    for rec in journal.all_bundles(store):
        if rec.bundle_id in keep:
            continue
        shutil.rmtree(rec.path, ignore_errors=True)
        shutil.rmtree(cache.cache_dir(ctx.config.state_dir, rec.bundle_id), ignore_errors=True)
        journal.forget_bundle(store, rec.bundle_id)
        _specs.pop(rec.bundle_id, None)


async def _gc_cluster(ctx: AgentContext, api: Any) -> None:
    keep = set()
    for key in (journal.CURRENT_KEY, PREVIOUS_KEY):
        rec = journal.get_bundle(ctx.store, ctx.store.get(key))
        if rec is not None:
            keep.add(inventory.name_for(bundle_name=rec.name, release=rec.release))
    await inventory.keep_only(api, keep)


def release_memory() -> None:
    """Give freed heap back to the OS after a memory-heavy phase (an install, a drift pass).

    CPython frees objects into glibc's arenas, which keep the pages; without this the daemon's
    RSS would stay at the peak of its biggest install for the rest of its life. glibc only.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def remember_version(ctx: AgentContext, api: Any) -> None:
    """Store the cluster's version for intake's compatibility check (it may run without API access)."""
    try:
        version = (await kube.ping(api)).get("gitVersion")
    except kube.KubeError:
        return
    if version and ctx.store.get("kube.version") != version:
        ctx.store.put("kube.version", version)


async def run_pending(ctx: AgentContext, api: Any) -> journal.Run | None:
    """Execute queued runs until none is left; returns the last one executed."""
    last = None
    while (run := journal.active_run(ctx.store)) is not None:
        last = await execute(ctx, api, run)
    return last


# --- public helpers for the link and the CLI ---------------------------------------------------


def report(store: StateStore) -> dict[str, Any]:
    """The installer's state for the hub / an operator: ``site.install`` plus the active run."""
    journal.setup(store)
    value = dict(store.get(sitestatus.INSTALL_KEY, {}) or {})
    run = journal.active_run(store)
    value["run"] = None if run is None else {
        "id": run.id, "bundle": run.bundle, "state": run.state, "position": run.position, "resumes": run.resumes,
        "error": run.error,
    }
    cur = journal.current(store)
    value["current"] = cur.bundle if cur else None
    prev = journal.get_bundle(store, store.get(PREVIOUS_KEY))
    value["last_good"] = prev.bundle if prev else None
    value["highwater"] = dict(zip(("release", "created"), journal.highwater(store), strict=True))
    value["bad_versions"] = journal.bad_versions(store)
    return value


def queue_rollback(ctx: AgentContext) -> journal.Run:
    """A commanded rollback: install the last good bundle again (it becomes current when it commits)."""
    prev = journal.get_bundle(ctx.store, ctx.store.get(PREVIOUS_KEY))
    if prev is None or not Path(prev.path).is_dir():
        raise LookupError("there is no last good bundle to roll back to")
    run = journal.new_run(ctx.store, prev)
    ctx.emit("install.rollback_requested", f"rollback to {prev.bundle} queued", data={"bundle": prev.bundle})
    publish(ctx)
    return run


# --- the daemon task ---------------------------------------------------------------------------


async def run(ctx: AgentContext) -> None:
    """Daemon task: execute queued runs; between them, supervise (health, drift)."""
    journal.setup(ctx.store)
    publish(ctx)
    async with kube.shared(ctx.config.kubeconfig) as api:
        supervisor = drift.Supervisor(ctx, api)
        await remember_version(ctx, api)
        while True:
            try:
                if journal.active_run(ctx.store) is not None:
                    with exclusive(ctx.config.state_dir) as mine:
                        if mine:
                            await run_pending(ctx, api)
                            supervisor.reset()
                            keep_only_current_spec(ctx)
                            release_memory()
                else:
                    await supervisor.tick()
            except kube.KubeUnavailable as exc:
                log.warning("API server unavailable; retrying", error=str(exc))
            await asyncio.sleep(POLL_SECONDS)


# --- CLI ---------------------------------------------------------------------------------------


def cli_context(args: argparse.Namespace) -> AgentContext:
    from agent import config as agent_config

    cfg = agent_config.load(Path(args.config))
    store = StateStore.open(cfg.state_dir)
    from agent import outbox

    outbox.setup(store)
    journal.setup(store)
    return AgentContext(config=cfg, store=store)


def cli_command(fn: Callable[[AgentContext, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapper(args: argparse.Namespace) -> int:
        from agent import config as agent_config

        try:
            ctx = cli_context(args)
        except agent_config.ConfigError as exc:
            print(f"edgefleet-agent: {exc}", file=sys.stderr)
            return exitcodes.CONFIG
        try:
            return fn(ctx, args)
        finally:
            ctx.store.close()

    return wrapper


async def drive(ctx: AgentContext) -> int:
    """Run queued installs in this process (``install run``, ``bundle import --wait``)."""
    with exclusive(ctx.config.state_dir) as mine:
        if not mine:
            print("edgefleet-agent: another process (the daemon?) is installing; see `edgefleet-agent install status`",
                  file=sys.stderr)
            return exitcodes.UNAVAILABLE
        try:
            async with kube.connect(ctx.config.kubeconfig) as api:
                await remember_version(ctx, api)
                while True:
                    try:
                        last = await run_pending(ctx, api)
                        break
                    except kube.KubeUnavailable as exc:
                        log.warning("API server unavailable; retrying", error=str(exc))
                        await asyncio.sleep(POLL_SECONDS)
        except kube.KubeConfigError as exc:
            print(f"edgefleet-agent: {exc}", file=sys.stderr)
            return exitcodes.CONFIG
    if last is None:
        return exitcodes.OK
    print(f"{last.bundle}: {last.state}" + (f" ({last.error})" if last.error else ""))
    return exitcodes.OK if last.state == "committed" else exitcodes.INSTALL_FAILED


def _cmd_run(ctx: AgentContext, args: argparse.Namespace) -> int:
    return asyncio.run(drive(ctx))


def _cmd_status(ctx: AgentContext, args: argparse.Namespace) -> int:
    value = report(ctx.store)
    if args.json:
        print(json.dumps(value, indent=2, sort_keys=True, default=str))
        return exitcodes.OK
    print(f"bundle:       {value.get('current') or '-'} (last good: {value.get('last_good') or '-'})")
    print(f"install:      {value.get('install_state', 'idle')}"
          + (f" {value['run']['bundle']} at {value['run']['position']}" if value.get("run") else ""))
    last = value.get("last_run") or {}
    if last:
        print(f"last run:     {last.get('bundle')} {last.get('state')} {last.get('error') or ''}".rstrip())
    for comp in value.get("components") or []:
        mark = "ok " if comp["healthy"] else "BAD"
        print(f"  [{mark}] L{comp['layer']} T{comp['tier']} {comp['name']} {comp.get('reason') or ''}".rstrip())
    for bad, reason in (value.get("bad_versions") or {}).items():
        print(f"bad version:  {bad}: {reason}")
    return exitcodes.OK


def _cmd_clear_bad(ctx: AgentContext, args: argparse.Namespace) -> int:
    if not journal.clear_bad(ctx.store, args.version):
        print(f"edgefleet-agent: {args.version} is not marked bad", file=sys.stderr)
        return exitcodes.NOT_FOUND
    ctx.emit("install.bad_cleared", f"{args.version} may be installed again", data={"bundle": args.version})
    publish(ctx)
    print(f"{args.version} may be installed again (re-import it)")
    return exitcodes.OK


def _cmd_rollback(ctx: AgentContext, args: argparse.Namespace) -> int:
    try:
        run = queue_rollback(ctx)
    except LookupError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return exitcodes.NOT_FOUND
    print(f"rollback to {run.bundle} queued")
    return asyncio.run(drive(ctx)) if args.wait else exitcodes.OK


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("install", help="the install engine: status, run, rollback, clear-bad-version")
    sub = parser.add_subparsers(dest="install_command", required=True, metavar="ACTION")
    p = sub.add_parser("status", help="installed bundle, install state, component health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cli_command(_cmd_status))
    p = sub.add_parser("run", help="execute queued or interrupted installs in this process (the daemon does it too)")
    p.set_defaults(func=cli_command(_cmd_run))
    p = sub.add_parser("rollback", help="re-install the last good bundle")
    p.add_argument("--wait", action="store_true", help="install it in this process instead of the daemon")
    p.set_defaults(func=cli_command(_cmd_rollback))
    p = sub.add_parser("clear-bad-version", help="allow a version marked bad to be installed again")
    p.add_argument("version", help="<bundle name>-<version>, as shown by `install status`")
    p.set_defaults(func=cli_command(_cmd_clear_bad))
