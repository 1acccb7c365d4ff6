"""Supervision of the committed bundle: component health per layer, and drift repair.

Health (every ``install.health_interval_seconds``): one label-selected LIST per workload kind
(Deployments, StatefulSets, DaemonSets, Jobs, CRDs), the gates' checks evaluated against it,
plus a GET per declared check on other kinds. An unhealthy workload's Pending pods are listed
(one LIST each, only then) so a container that cannot get its image is the reported reason.
Results go to ``site.install`` and metrics.

Drift (every ``install.drift_interval_seconds``): per component and kind, a metadata-only LIST
(a server-side ``Table`` with ``includeObject=Metadata``: names and resourceVersions, not the
objects). An object whose resourceVersion is the one we last verified has not changed and is
skipped without reading it; so is one whose ``metadata.generation`` is still the verified one
while its labels and annotations (in the metadata LIST) still hold the bundle's: the API server
bumps the generation on every change to anything but metadata and status, so only its status
changed (a CRD becoming Established, a Deployment's replicas counting up: the first pass after
an install would otherwise read all ~8 MB of CRDs once more). A missing one is applied again;
any other changed one is read and compared:
if its live state no longer contains what the bundle sets (labels, spec, data ...: "desired ⊆
live", so server defaults and other managers' fields are not drift), it is server-side applied
again. Repairs are reported in one ``drift.repaired`` event. The resourceVersion after a repair
becomes the verified one, so values the API server normalises (``cpu: 0.5`` → ``500m``) never
turn into an apply loop. A quiet site thus costs a few small LISTs per interval, not a re-read of
~10 MB of objects (the full platform's CRDs alone are ~8 MB). CRD health uses the same trick.
The verified versions are persisted (``install_verified``, with the cluster they belong to, see
:func:`cluster_id`), and an install records each object's version as it applied it, so neither
a restart nor an upgrade makes the next pass read the whole bundle again.

A workload the degradation controller scaled down (``edgefleet.io/original-replicas``) keeps its
live replica count (render.keep_live_replicas), so supervisor and degradation never fight.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import structlog

from agent import jsonpick, kube, metrics, protocol
from agent.context import AgentContext
from agent.install import apply, gates, journal, model, render
from agent.state import StateStore

log = structlog.get_logger("edgefleet.drift")

HEALTH_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CustomResourceDefinition")
TABLE_ACCEPT = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


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


def _as_stored(desired: dict[str, Any]) -> dict[str, Any]:
    """What the API server stores for ``desired``: a Secret's ``stringData`` becomes base64 ``data``."""
    string_data = desired.get("stringData")
    if desired.get("kind") != "Secret" or not isinstance(string_data, dict):
        return desired
    data = dict(desired.get("data") or {})
    for key, value in string_data.items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    return {**{k: v for k, v in desired.items() if k != "stringData"}, "data": data}


def differs(desired: dict[str, Any], live: dict[str, Any]) -> bool:
    desired = _as_stored(desired)
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


async def cluster_id(api: Any) -> str:
    """The cluster's identity: the uid of its ``kube-system`` Namespace ('' if unknown).

    resourceVersions are etcd revisions: an object's resourceVersion names one write in one
    cluster's history, so a stored verified version is proof only within that history. An etcd
    restore keeps the history (a restored object carries the revision of the write it had, so it
    still matches exactly what was verified at it, or differs and is re-read); a rebuilt cluster
    starts a new one, with a new ``kube-system`` uid.
    """
    try:
        ns = await kube.get(api, "v1", "Namespace", "kube-system", fields=("metadata",))
    except kube.KubeUnavailable:
        raise
    except kube.KubeError:
        return ""
    return str(((ns or {}).get("metadata") or {}).get("uid") or "")


async def load_verified(store: StateStore, api: Any) -> dict[str, model.Seen]:
    """The persisted verified resourceVersions, if they were recorded in this cluster.

    Persisted so that the first drift pass after a restart reads only what changed while the
    agent was down, not every object of the bundle (~10 MB for the IDP platform, the daemon's
    largest memory burst after an install).
    """
    uid = await cluster_id(api)
    if uid and store.get(journal.VERIFIED_CLUSTER_KEY) == uid:
        return journal.verified_versions(store)
    return {}


async def save_verified(store: StateStore, api: Any, versions: dict[str, model.Seen], *,
                        replace: bool = False) -> None:
    """Persist verified resourceVersions (an install's apply answers, a drift pass's findings)
    for this cluster; rows recorded for another cluster are dropped first."""
    uid = await cluster_id(api)
    if not uid:
        return
    if store.get(journal.VERIFIED_CLUSTER_KEY) != uid:
        with store.transaction():
            journal.save_verified(store, {}, replace=True)
            store.put(journal.VERIFIED_CLUSTER_KEY, uid)
    journal.save_verified(store, versions, replace=replace)


@dataclass(frozen=True)
class _Meta:
    """What drift keeps of an object in a metadata LIST (not its managedFields and the rest)."""

    seen: model.Seen
    labels: dict[str, Any]
    annotations: dict[str, Any]


def _status_only(live: _Meta, verified: model.Seen | None, desired: dict[str, Any]) -> bool:
    """Whether a changed object can only have changed in its status: the generation it was
    verified at is still its generation (the API server bumps it for any change but to metadata
    and status; 0 means its kind has none, so it proves nothing) and its labels and annotations
    still hold the bundle's (``desired``: the document's head)."""
    if verified is None or not verified[1] or verified[1] != live.seen[1]:
        return False
    meta = desired.get("metadata") or {}
    return contains(meta.get("labels") or {}, live.labels) and contains(meta.get("annotations") or {},
                                                                         live.annotations)


class Supervisor:
    def __init__(self, ctx: AgentContext, api: Any) -> None:
        self.ctx = ctx
        self.api = api
        self.next_health = 0.0
        self.next_drift = time.monotonic() + ctx.config.install.drift_interval_seconds
        #: key → (resourceVersion, generation) at which the live object was last seen to match
        #: the bundle (persisted: see :func:`load_verified`); None until loaded.
        self.verified: dict[str, model.Seen] | None = None
        #: key → resourceVersion at which a CRD was last seen Established.
        self.established: dict[str, str] = {}

    def reset(self) -> None:
        """After an install run: reload what it verified (:func:`save_verified`), re-check health."""
        self.next_health = 0.0
        self.verified = None
        self.established.clear()

    async def tick(self) -> None:
        now = time.monotonic()
        if now < self.next_health and now < self.next_drift:
            return
        from agent import installer

        cur = journal.current(self.ctx.store)
        if cur is None:
            return
        spec = await installer.spec_for(self.ctx, cur)
        if now >= self.next_drift:
            await self.repair(spec)
            self.next_drift = time.monotonic() + self.ctx.config.install.drift_interval_seconds
        await self.health(spec)
        # Both passes leave freed API answers in the heap: hand them back now, not at the next
        # drift pass (steady RSS -1 to -2 MiB; cheap, see agent.daemon.run on gc.freeze).
        installer.release_memory()
        self.next_health = time.monotonic() + self.ctx.config.install.health_interval_seconds

    async def _list(self, api_version: str, kind: str, selector: str) -> dict[str, dict[str, Any]] | None:
        try:
            items = await kube.list_objects(self.api, api_version, kind, label_selector=selector)
        except (kube.UnknownKind, kube.NotFound):
            kube.forget(self.api, api_version)
            return None  # its CRD is gone: every object of it is missing
        return {model.Ref.of(item).key: item for item in items}

    async def _versions(self, api_version: str, kind: str, selector: str) -> dict[str, _Meta] | None:
        """key → what :class:`_Meta` keeps of the matching objects, from a metadata-only Table LIST."""
        try:
            resource = await kube.resource_for(self.api, api_version, kind)
            doc = await kube.request(
                self.api, "GET", resource.path(), query={"labelSelector": selector, "includeObject": "Metadata"},
                accept=TABLE_ACCEPT,
            ) or {}
        except (kube.UnknownKind, kube.NotFound):
            kube.forget(self.api, api_version)
            return None
        group = api_version.rpartition("/")[0]
        out: dict[str, _Meta] = {}
        # a server without Table support answers with the plain list
        rows = [row.get("object") or {} for row in doc.get("rows") or []] if doc.get("kind") == "Table" \
            else doc.get("items") or []
        for item in rows:
            meta = item.get("metadata") or {}
            ref = model.Ref(group=group, kind=kind, namespace=str(meta.get("namespace") or ""),
                            name=str(meta.get("name", "")))
            out[ref.key] = _Meta(seen=model.seen(item), labels=meta.get("labels") or {},
                                 annotations=meta.get("annotations") or {})
        return out

    async def health(self, spec: model.Spec) -> list[dict[str, Any]]:
        from agent import installer

        selector = f"{model.LABEL_MANAGED_BY}={model.MANAGED_BY}"
        kinds = {k for u in spec.units for k in u.kinds if k[1] in HEALTH_KINDS}
        live: dict[str, dict[str, Any]] = {}
        crd_versions: dict[str, str] = {}
        for api_version, kind in sorted(kinds):
            if kind == "CustomResourceDefinition":
                crd_versions.update({key: meta.seen[0] for key, meta in
                                     (await self._versions(api_version, kind, selector) or {}).items()})
            else:
                live.update(await self._list(api_version, kind, selector) or {})
        results: dict[str, tuple[bool, str, bool]] = {}
        for unit in spec.units:
            healthy, reason, degraded = True, "", False
            for check in unit.gate_checks:
                key = model.Ref(group=str(check["apiVersion"]).rpartition("/")[0], kind=str(check["kind"]),
                                namespace=str(check.get("namespace") or ""), name=str(check["name"])).key
                obj = live.get(key)
                try:
                    if check["type"] == "crd-established":
                        ok, why = await self._crd(check, key, crd_versions.get(key))
                    elif check["kind"] in HEALTH_KINDS and check["type"] != "condition":
                        ok, why = gates.evaluate(check, obj)
                        if not ok and obj is not None:
                            why = await self._image_reason(check, obj, why)
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

    async def _image_reason(self, check: dict[str, Any], obj: dict[str, Any], why: str) -> str:
        """An unhealthy workload whose pods cannot get their image says so (pod, image, kubelet reason),
        not just "available 0/1": one pod LIST, only for workloads already found unhealthy."""
        try:
            problem = gates.image_problem(await gates.pods_of(self.api, check, obj))
        except kube.KubeError as exc:
            log.debug("pods of an unhealthy workload not listed", check=check["name"], error=str(exc))
            return why
        return f"{gates.describe(check)}: {problem}" if problem else why

    async def _crd(self, check: dict[str, Any], key: str, version: str | None) -> tuple[bool, str]:
        if version is None:
            self.established.pop(key, None)
            return False, f"CustomResourceDefinition {check['name']} does not exist"
        if self.established.get(key) == version:
            return True, ""
        ok, why = await gates.probe(self.api, check)
        if ok:
            self.established[key] = version
        return ok, why

    async def repair(self, spec: model.Spec) -> list[str]:
        """One component at a time; a component's objects are parsed only if something changed."""
        if self.verified is None:
            self.verified = await load_verified(self.ctx.store, self.api)
        verified = self.verified
        repaired: list[str] = []
        learned = 0
        kinds_fixed: Counter[str] = Counter()
        versions: dict[str, _Meta] = {}  # one metadata LIST per kind for the whole bundle
        for api_version, kind in sorted({k for u in spec.units for k in u.kinds}):
            versions.update(await self._versions(api_version, kind, f"{model.LABEL_MANAGED_BY}={model.MANAGED_BY}")
                            or {})
        for unit in spec.units:
            suspect = [k for k in unit.keys if k not in versions or versions[k].seen != verified.get(k)]
            if not suspect:
                continue
            # One GET per changed object, not a LIST of the component: a pass without stored
            # versions (another cluster) reads everything, and a LIST of big CRDs would balloon
            # the heap for good. Likewise the bundle's side is parsed one object at a time.
            for key, raw in unit.documents(suspect, order=render.key_order):
                live = versions.get(key)
                if live is not None and _status_only(live, verified.get(key), jsonpick.head(raw)):
                    verified[key] = live.seen
                    learned += 1
                    continue
                obj = json.loads(raw)
                have = await self._get(obj) if live is not None else None
                if have is not None:
                    want = render.keep_live_replicas(obj, have)
                    if not differs(want, have):
                        verified[key] = model.seen(have)
                        learned += 1
                        continue
                try:
                    after = await apply.apply_object(self.api, obj, deadline=time.monotonic() + 30)
                except apply.ApplyFailed as exc:
                    log.warning("drift repair failed", object=str(model.Ref.of(obj)), error=str(exc))
                    continue
                verified[key] = model.seen(after)
                learned += 1
                repaired.append(f"{'restored' if have is None else 'reverted'} {model.Ref.of(obj)}")
                kinds_fixed[str(obj["kind"])] += 1
                metrics.DRIFT_REPAIRS.labels(str(obj["kind"])).inc()
        if learned:
            keys = set(spec.refs())
            await save_verified(self.ctx.store, self.api, {k: v for k, v in verified.items() if k in keys},
                                replace=True)
        if repaired:
            self.ctx.emit(
                "drift.repaired", f"{len(repaired)} platform objects brought back to {spec.label}",
                severity=protocol.Severity.WARNING,
                data={"bundle": spec.label, "objects": repaired[:50], "kinds": dict(kinds_fixed)},
            )
        return repaired

    async def _get(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        meta = obj.get("metadata") or {}
        try:
            return await kube.get(self.api, str(obj["apiVersion"]), str(obj["kind"]), str(meta["name"]),
                                  namespace=meta.get("namespace"))
        except (kube.UnknownKind, kube.NotFound):
            return None
