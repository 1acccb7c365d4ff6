"""Supervision of the committed bundle: component health per layer, and drift repair.

Health (every ``install.health_interval_seconds``): one label-selected LIST per workload kind
(Deployments, StatefulSets, DaemonSets, Jobs, CRDs), the gates' checks evaluated against it,
plus a GET per declared check on other kinds. Results go to ``site.install`` and metrics.

Drift (every ``install.drift_interval_seconds``): one LIST per kind the bundle has; an object
that is missing, or whose live state no longer contains what the bundle sets (labels, spec,
data ...: "desired ⊆ live", so server defaults and other managers' fields are not drift), is
server-side applied again and reported as a ``drift.repaired`` event. Some values come back
normalised by the API server (``cpu: 0.5`` → ``500m``); when an object still "differs" right
after a repair, its resourceVersion is remembered and it is not repaired again until it
changes, so normalisation never turns into an apply loop.

A workload the degradation controller scaled down (``edgefleet.io/original-replicas``) keeps its
live replica count (render.keep_live_replicas), so supervisor and degradation never fight.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import structlog

from agent import kube, metrics, protocol
from agent.context import AgentContext
from agent.install import apply, gates, journal, model, render

log = structlog.get_logger("edgefleet.drift")

HEALTH_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CustomResourceDefinition")


def contains(want: Any, have: Any) -> bool:
    """Whether ``have`` (live) still holds everything ``want`` (desired) sets."""
    if want is None:
        return True
    if isinstance(want, dict):
        if not want:
            return have is None or isinstance(have, dict)
        if not isinstance(have, dict):
            return False
        return all(contains(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        if not want:
            return have is None or have == []
        return isinstance(have, list) and len(want) == len(have) and all(
            contains(w, h) for w, h in zip(want, have, strict=True))
    if isinstance(want, bool) or isinstance(have, bool):
        return want is have or (want == have and type(want) is type(have))
    if isinstance(want, int | float) and isinstance(have, int | float):
        return float(want) == float(have)
    return bool(want == have)


def differs(desired: dict[str, Any], live: dict[str, Any]) -> bool:
    for key, value in desired.items():
        if key in ("apiVersion", "kind", "status"):
            continue
        if key == "metadata":
            meta = value or {}
            live_meta = live.get("metadata") or {}
            if not contains(meta.get("labels") or {}, live_meta.get("labels") or {}):
                return True
            if not contains(meta.get("annotations") or {}, live_meta.get("annotations") or {}):
                return True
            continue
        if not contains(value, live.get(key)):
            return True
    return False


class Supervisor:
    def __init__(self, ctx: AgentContext, api: Any) -> None:
        self.ctx = ctx
        self.api = api
        self.next_health = 0.0
        self.next_drift = time.monotonic() + ctx.config.install.drift_interval_seconds
        self.normalised: dict[str, str] = {}  # key → resourceVersion that "differs" only by normalisation

    def reset(self) -> None:
        self.next_health = 0.0
        self.normalised.clear()

    async def tick(self) -> None:
        now = time.monotonic()
        if now < self.next_health and now < self.next_drift:
            return
        from agent import installer

        cur = journal.current(self.ctx.store)
        if cur is None:
            return
        spec = await installer.spec_for(self.ctx, cur)
        repair = now >= self.next_drift
        if repair:
            await self.repair(spec)
            self.next_drift = time.monotonic() + self.ctx.config.install.drift_interval_seconds
        await self.health(spec)
        self.next_health = time.monotonic() + self.ctx.config.install.health_interval_seconds

    async def _live(self, kinds: set[tuple[str, str]], selector: str) -> dict[str, dict[str, Any]]:
        live: dict[str, dict[str, Any]] = {}
        for api_version, kind in sorted(kinds):
            try:
                items = await kube.list_objects(self.api, api_version, kind, label_selector=selector)
            except (kube.UnknownKind, kube.NotFound):
                kube.forget(self.api, api_version)
                continue  # its CRD is gone: every object of it is missing
            for item in items:
                live[model.Ref.of(item).key] = item
        return live

    async def health(self, spec: model.Spec) -> list[dict[str, Any]]:
        from agent import installer

        kinds = {k for u in spec.units for k in u.kinds if k[1] in HEALTH_KINDS}
        live = await self._live(kinds, f"{model.LABEL_MANAGED_BY}={model.MANAGED_BY}")
        results: dict[str, tuple[bool, str, bool]] = {}
        for unit in spec.units:
            healthy, reason, degraded = True, "", False
            for check in unit.gate_checks:
                key = model.Ref(group=str(check["apiVersion"]).rpartition("/")[0], kind=str(check["kind"]),
                                namespace=str(check.get("namespace") or ""), name=str(check["name"])).key
                obj = live.get(key)
                try:
                    if check["kind"] in HEALTH_KINDS and check["type"] != "condition":
                        ok, why = gates.evaluate(check, obj)
                    else:
                        ok, why = await gates.probe(self.api, check)
                except gates.GateFailed as exc:
                    ok, why = False, str(exc)
                annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
                degraded = degraded or model.ANNOTATION_ORIGINAL_REPLICAS in annotations
                if not ok and healthy:
                    healthy, reason = False, why
            results[unit.name] = (healthy, reason, degraded)
        del live
        components = installer.component_health(spec, results)
        installer.publish(self.ctx, components=components)
        metrics.refresh(self.ctx.store)
        return components

    async def repair(self, spec: model.Spec) -> list[str]:
        """One component at a time, so only one component's objects are ever parsed at once."""
        repaired: list[str] = []
        kinds_fixed: Counter[str] = Counter()
        for unit in spec.units:
            selector = f"{model.LABEL_MANAGED_BY}={model.MANAGED_BY},{model.LABEL_COMPONENT}={unit.name}"
            live = await self._live(unit.kinds, selector)
            for obj in sorted(unit.objects, key=render.order_key):
                key = model.Ref.of(obj).key
                have = live.get(key)
                if have is not None:
                    want = render.keep_live_replicas(obj, have)
                    rv = str((have.get("metadata") or {}).get("resourceVersion", ""))
                    if not differs(want, have) or self.normalised.get(key) == rv:
                        continue
                try:
                    after = await apply.apply_object(self.api, obj, deadline=time.monotonic() + 30)
                except apply.ApplyFailed as exc:
                    log.warning("drift repair failed", object=str(model.Ref.of(obj)), error=str(exc))
                    continue
                if differs(render.keep_live_replicas(obj, after), after):
                    self.normalised[key] = str((after.get("metadata") or {}).get("resourceVersion", ""))
                repaired.append(f"{'restored' if have is None else 'reverted'} {model.Ref.of(obj)}")
                kinds_fixed[str(obj["kind"])] += 1
                metrics.DRIFT_REPAIRS.labels(str(obj["kind"])).inc()
            del live
        if repaired:
            self.ctx.emit(
                "drift.repaired", f"{len(repaired)} platform objects brought back to {spec.label}",
                severity=protocol.Severity.WARNING,
                data={"bundle": spec.label, "objects": repaired[:50], "kinds": dict(kinds_fixed)},
            )
        return repaired
