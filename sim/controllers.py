"""Workload controllers (Deployment, ReplicaSet, StatefulSet, DaemonSet, Job), namespaces and PDB status.

Level-triggered like the real ones: a store event marks the affected object dirty, and ``run_dirty``
reconciles it from the current state. Every write goes through ``ApiServer`` (manager ``k3s``), and a
reconcile that changes nothing writes nothing, so the loop settles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from typing import TYPE_CHECKING, Any

from sim import apiserver, errors, selectors
from sim.store import Event

if TYPE_CHECKING:
    from sim.cluster import Cluster

MANAGER = "k3s"
DS_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
]
_KINDS = {("apps", "deployments"): "Deployment", ("apps", "replicasets"): "ReplicaSet",
          ("apps", "statefulsets"): "StatefulSet", ("apps", "daemonsets"): "DaemonSet", ("batch", "jobs"): "Job"}
_KEY_OF = {v: k for k, v in _KINDS.items()}


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(obj))
    return out


def template_hash(template: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    n = int(digest[:16], 16)
    out = ""
    for _ in range(10):
        n, r = divmod(n, len(alphabet))
        out += alphabet[r]
    return out


def _resolve(value: Any, total: int, *, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        frac = float(value[:-1]) / 100 * total
        return math.ceil(frac) if round_up else math.floor(frac)
    return int(value or 0)


def is_active(pod: dict[str, Any]) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and \
        (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _cond(old: list[dict[str, Any]], ctype: str, status: str, reason: str, message: str,
          *, update_time: bool = False) -> dict[str, Any]:
    now = apiserver.now_iso()
    prev = next((c for c in old if c.get("type") == ctype), None)
    same = prev is not None and prev.get("status") == status
    c = {"type": ctype, "status": status}
    if update_time:
        c["lastUpdateTime"] = prev.get("lastUpdateTime", now) if same and prev and prev.get("reason") == reason \
            else now
    c["lastTransitionTime"] = prev.get("lastTransitionTime", now) if same and prev else now
    c["reason"] = reason
    c["message"] = message
    return c


class Controllers:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.api = cluster.api
        self.dirty: set[tuple[str, str, str]] = set()
        self.foreground_pending = False
        self._backoff: dict[tuple[str, str, str], float] = {}
        self._armed: set[tuple[str, str, str]] = set()
        self._failed: set[tuple[str, str, str]] = set()

    # --- event routing -----------------------------------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        key = ev.key
        entry = ev.entry
        if key in _KINDS:
            self.dirty.add((_KINDS[key], entry.namespace, entry.name))
        if key == ("", "namespaces"):
            self.dirty.add(("Namespace", "", entry.name))
        if b'"foregroundDeletion"' in entry.raw:
            self.foreground_pending = True  # stays set while a foreground deletion waits for its dependents
        if key in (("", "pods"), ("apps", "replicasets")) or key in _KINDS:
            meta = entry.obj.get("metadata") or {}
            for ref in meta.get("ownerReferences") or []:
                if ref.get("controller") and ref.get("kind") in _KEY_OF:
                    self.dirty.add((ref["kind"], entry.namespace, ref.get("name", "")))
        if key in (("", "pods"), ("", "services")):
            self.dirty.add(("Endpoints", entry.namespace, ""))
        if key == ("", "pods"):
            self.dirty.add(("PDB", entry.namespace, ""))
            if ev.type == "DELETED":
                self.dirty.add(("Namespace", "", entry.namespace))
        elif ev.type == "DELETED" and entry.namespace:
            self.dirty.add(("Namespace", "", entry.namespace))
        if key == ("", "nodes"):
            if ev.type != "DELETED":
                self.dirty.add(("Node", "", entry.name))
            for ds in self.c.store.iter(("apps", "daemonsets")):
                self.dirty.add(("DaemonSet", ds.namespace, ds.name))
        if key == ("policy", "poddisruptionbudgets") and ev.type != "DELETED":
            self.dirty.add(("PDB", entry.namespace, ""))
        if key == ("", "serviceaccounts") and ev.type == "ADDED":
            self._retry_all()

    def _retry_all(self) -> None:
        for key, kind in _KINDS.items():
            for e in self.c.store.iter(key):
                self.dirty.add((kind, e.namespace, e.name))

    def _retry_later(self, kind: str, ns: str, name: str) -> None:
        """Re-sync one object later with exponential backoff (controller_retry doubling up to 5 sim-minutes),
        like a workqueue's rate limiter; a success (``_backoff_reset``) starts over."""
        key = (kind, ns, name)
        if key in self._armed:
            return
        delay = self._backoff.get(key, self.c.timing.controller_retry)
        self._backoff[key] = min(delay * 2, 300.0)
        self._armed.add(key)

        def fire() -> None:
            self._armed.discard(key)
            self.dirty.add(key)

        self.c.later(delay, fire)

    def sync_all(self) -> None:
        self._retry_all()
        for e in self.c.store.iter(("", "namespaces")):
            self.dirty.add(("Namespace", "", e.name))
        self.run_dirty()

    def run_dirty(self) -> None:
        rounds = 0
        while self.dirty and rounds < 50:
            rounds += 1
            batch = sorted(self.dirty)
            self.dirty.clear()
            for kind, ns, name in batch:
                key = (kind, ns, name)
                self._failed.discard(key)
                try:
                    getattr(self, f"_sync_{kind.lower()}")(ns, name)
                except errors.ApiError as exc:
                    if exc.code == 409:
                        self.dirty.add(key)
                        continue
                    self.c.log(f"{kind} {ns}/{name}: {exc.message}")
                    self._failed.add(key)
                if key in self._failed:
                    self._retry_later(kind, ns, name)
                else:
                    self._backoff.pop(key, None)
        if self.dirty:
            self.c.wake()

    # --- helpers -----------------------------------------------------------------------------------------------
    def _get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        return self.api.get(_KEY_OF[kind], ns, name)

    def _owned(self, key: tuple[str, str], ns: str, uid: str) -> list[dict[str, Any]]:
        out = []
        for e in self.c.store.select(key, ns):
            if uid.encode() in e.raw:
                refs = e.obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == uid and r.get("controller") for r in refs):
                    out.append(e.obj)
        return out

    def _pods_of(self, owner: dict[str, Any]) -> list[dict[str, Any]]:
        return self._owned(("", "pods"), owner["metadata"]["namespace"], owner["metadata"]["uid"])

    def _write_status(self, kind: str, obj: dict[str, Any], status: dict[str, Any]) -> None:
        if obj.get("status") == status:
            return
        new = _copy(obj)
        new["status"] = status
        res = self.c.res(*_KEY_OF[kind])
        self.api.update(res, obj["metadata"]["namespace"], obj["metadata"]["name"], new, manager=MANAGER,
                        subresource="status")

    def _create_pod(self, owner: dict[str, Any], template: dict[str, Any], *, name: str = "",
                    generate: str = "", extra_labels: dict[str, str] | None = None,
                    mutate: Any = None) -> bool:
        tmpl = _copy(template)
        meta = tmpl.get("metadata") or {}
        labels = dict(meta.get("labels") or {})
        labels.update(extra_labels or {})
        pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"labels": labels, "annotations": meta.get("annotations") or {},
                                            "ownerReferences": [owner_ref(owner)],
                                            "namespace": owner["metadata"]["namespace"]},
                               "spec": tmpl.get("spec") or {}}
        if not pod["metadata"]["annotations"]:
            del pod["metadata"]["annotations"]
        if name:
            pod["metadata"]["name"] = name
        else:
            pod["metadata"]["generateName"] = generate
        if mutate:
            mutate(pod)
        try:
            self.api.create(self.c.res("", "pods"), owner["metadata"]["namespace"], pod, manager=MANAGER,
                            internal=True)
            return True
        except errors.ApiError as exc:
            if exc.code != 409:
                self.c.log(f"{owner['kind']} {owner['metadata']['namespace']}/{owner['metadata']['name']}: "
                           f"FailedCreate: {exc.message}")
                self._event(owner, "Warning", "FailedCreate", f"Error creating: {exc.message}")
                self._failed.add((owner["kind"], owner["metadata"]["namespace"], owner["metadata"]["name"]))
            return False

    def _delete_pod(self, pod: dict[str, Any]) -> None:
        try:
            self.api.delete(self.c.res("", "pods"), pod["metadata"]["namespace"], pod["metadata"]["name"])
        except errors.ApiError as exc:
            if exc.code != 404:
                raise

    def _event(self, obj: dict[str, Any], etype: str, reason: str, message: str, *,
               component: str = "k3s") -> None:
        """Record an Event; repeats of the same (object, reason, message) bump ``count`` like the real
        event recorder's aggregation, so retry loops do not pile up objects."""
        meta = obj["metadata"]
        ns = meta.get("namespace") or "default"
        now = apiserver.now_iso()
        digest = hashlib.sha256(f"{meta.get('uid')}/{reason}/{message}".encode()).hexdigest()[:16]
        name = f"{meta['name']}.{digest}"
        res = self.c.res("", "events")
        try:
            old = self.api.get(("", "events"), ns, name)
            if old is not None:
                new = _copy(old)
                new["count"] = int(old.get("count", 1)) + 1
                new["lastTimestamp"] = now
                self.api.update(res, ns, name, new, manager="")
                return
            ev = {"metadata": {"name": name, "namespace": ns},
                  "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                                     "name": meta["name"], "namespace": meta.get("namespace"),
                                     "uid": meta.get("uid")},
                  "reason": reason, "message": message, "type": etype, "count": 1, "firstTimestamp": now,
                  "lastTimestamp": now, "source": {"component": component}, "reportingComponent": component}
            self.api.create(res, ns, ev, manager="", internal=True)
        except errors.ApiError:
            pass

    # --- namespaces --------------------------------------------------------------------------------------------
    def _sync_namespace(self, _: str, name: str) -> None:
        ns = self.api.get(("", "namespaces"), "", name)
        if ns is None:
            return
        if (ns.get("status") or {}).get("phase") == "Terminating":
            remaining = 0
            for res in self.c.registry.all_resources():
                if not res.namespaced or res.version != self.c.registry.group_versions(res.group)[0]:
                    continue
                for e in self.c.store.select(res.storage_key, name):
                    remaining += 1
                    if not (e.obj.get("metadata") or {}).get("deletionTimestamp"):
                        with contextlib.suppress(errors.ApiError):
                            self.api.delete(res, name, e.name)
            if remaining == 0:
                self.api.store.delete(("", "namespaces"), "", name)
            return
        if self.api.get(("", "serviceaccounts"), name, "default") is None:
            self.api.create(self.c.res("", "serviceaccounts"), name, {"metadata": {"name": "default"}},
                            manager="", internal=True)
        if self.api.get(("", "configmaps"), name, "kube-root-ca.crt") is None:
            self.api.create(self.c.res("", "configmaps"), name,
                            {"metadata": {"name": "kube-root-ca.crt",
                                          "annotations": {"kubernetes.io/description": "Contains a CA bundle that "
                                                          "can be used to verify the kube-apiserver when using "
                                                          "internal endpoints such as the internal service IP or "
                                                          "kubernetes.default.svc. No other usage is guaranteed "
                                                          "across distributions of Kubernetes clusters."}},
                             "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\nsim\n-----END CERTIFICATE-----\n"}},
                            manager="", internal=True)

    # --- node lifecycle: the unschedulable taint follows spec.unschedulable (TaintNodesByCondition) ----------
    def _sync_node(self, _: str, name: str) -> None:
        node = self.api.get(("", "nodes"), "", name)
        if node is None:
            return
        taints = list((node.get("spec") or {}).get("taints") or [])
        has = any(t.get("key") == "node.kubernetes.io/unschedulable" for t in taints)
        want = bool((node.get("spec") or {}).get("unschedulable"))
        if has == want:
            return
        if want:
            taints.append({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule",
                           "timeAdded": apiserver.now_iso()})
        else:
            taints = [t for t in taints if t.get("key") != "node.kubernetes.io/unschedulable"]
        new = _copy(node)
        if taints:
            new["spec"]["taints"] = taints
        else:
            new["spec"].pop("taints", None)
        self.api.update(self.c.res("", "nodes"), "", name, new, manager=MANAGER)

    # --- Endpoints: ready / not-ready pod addresses behind each selector Service --------------------------
    def _sync_endpoints(self, ns: str, _: str) -> None:
        res = self.c.res("", "endpoints")
        pods = [p for p in self.api.list_objects(("", "pods"), ns)
                if is_active(p) and (p.get("status") or {}).get("podIP")]
        for svc in self.api.list_objects(("", "services"), ns):
            spec = svc.get("spec") or {}
            name = svc["metadata"]["name"]
            if ns == "default" and name == "kubernetes":
                subsets = [{"addresses": [{"ip": "172.18.0.2"}],
                            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}]
            elif spec.get("selector"):
                members = [p for p in pods if all((p["metadata"].get("labels") or {}).get(k) == v
                                                  for k, v in spec["selector"].items())]
                subsets = self._subsets(spec, members)
            else:
                continue  # selector-less Services: endpoints are the user's business
            want: dict[str, Any] = {"apiVersion": "v1", "kind": "Endpoints",
                                    "metadata": {"name": name, "namespace": ns,
                                                 "labels": dict(svc["metadata"].get("labels") or {})}}
            if subsets:
                want["subsets"] = subsets
            cur = self.api.get(("", "endpoints"), ns, name)
            if cur is None:
                self.api.create(res, ns, want, manager="", internal=True)
            elif cur.get("subsets") != want.get("subsets"):
                new = _copy(cur)
                new.pop("subsets", None)
                if subsets:
                    new["subsets"] = subsets
                self.api.update(res, ns, name, new, manager=MANAGER)

    @staticmethod
    def _subsets(spec: dict[str, Any], members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not members:
            return []
        ready: list[dict[str, Any]] = []
        not_ready: list[dict[str, Any]] = []
        ports = []
        for sp in spec.get("ports") or []:
            target = sp.get("targetPort", sp.get("port"))
            if isinstance(target, str):
                target = next((cp.get("containerPort") for p in members for c in p["spec"].get("containers") or []
                               for cp in c.get("ports") or [] if cp.get("name") == target), None)
            if target is None:
                continue
            port = {"port": int(target), "protocol": sp.get("protocol", "TCP")}
            if sp.get("name"):
                port["name"] = sp["name"]
            ports.append(port)
        for p in sorted(members, key=lambda p: p["status"]["podIP"]):
            addr = {"ip": p["status"]["podIP"], "nodeName": p["spec"].get("nodeName"),
                    "targetRef": {"kind": "Pod", "name": p["metadata"]["name"],
                                  "namespace": p["metadata"]["namespace"], "uid": p["metadata"].get("uid")}}
            (ready if is_ready(p) else not_ready).append(addr)
        subset: dict[str, Any] = {}
        if ready:
            subset["addresses"] = ready
        if not_ready:
            subset["notReadyAddresses"] = not_ready
        if ports:
            subset["ports"] = ports
        return [subset]

    # --- PDB status --------------------------------------------------------------------------------------------
    def _sync_pdb(self, ns: str, _: str) -> None:
        for pdb in self.api.list_objects(("policy", "poddisruptionbudgets"), ns):
            reqs = selectors.from_label_selector((pdb.get("spec") or {}).get("selector"))
            pods = [p for p in self.api.list_objects(("", "pods"), ns)
                    if reqs is not None and selectors.match_labels(reqs, p["metadata"].get("labels"))
                    and is_active(p)]
            healthy = sum(1 for p in pods if is_ready(p))
            spec = pdb.get("spec") or {}
            expected = len(pods)
            if "minAvailable" in spec:
                desired = _resolve(spec["minAvailable"], expected, round_up=True)
            elif "maxUnavailable" in spec:
                desired = max(0, expected - _resolve(spec["maxUnavailable"], expected, round_up=True))
            else:
                desired = expected
            allowed = max(0, healthy - desired)
            status = {"observedGeneration": pdb["metadata"].get("generation", 1), "disruptionsAllowed": allowed,
                      "currentHealthy": healthy, "desiredHealthy": desired, "expectedPods": expected,
                      "conditions": [_cond((pdb.get("status") or {}).get("conditions") or [], "DisruptionAllowed",
                                           "True" if allowed > 0 else "False",
                                           "SufficientPods" if allowed > 0 else "InsufficientPods", "")]}
            if pdb.get("status") != status:
                new = _copy(pdb)
                new["status"] = status
                self.api.update(self.c.res("policy", "poddisruptionbudgets"), ns, pdb["metadata"]["name"], new,
                                manager=MANAGER, subresource="status")

    # --- ReplicaSet --------------------------------------------------------------------------------------------
    def _sync_replicaset(self, ns: str, name: str) -> None:
        rs = self._get("ReplicaSet", ns, name)
        if rs is None:
            return
        pods = self._pods_of(rs)
        active = [p for p in pods if is_active(p)]
        want = int((rs.get("spec") or {}).get("replicas", 1))
        if not rs["metadata"].get("deletionTimestamp"):
            if len(active) < want:
                for _ in range(want - len(active)):
                    if not self._create_pod(rs, rs["spec"].get("template") or {}, generate=f"{name}-"):
                        break
            elif len(active) > want:
                def rank(p: dict[str, Any]) -> tuple[int, int, int, str]:
                    return (1 if (p.get("spec") or {}).get("nodeName") else 0,
                            1 if (p.get("status") or {}).get("phase") == "Running" else 0,
                            1 if is_ready(p) else 0, "~" + p["metadata"].get("creationTimestamp", ""))
                for p in sorted(active, key=rank)[: len(active) - want]:
                    self._delete_pod(p)
        pods = self._pods_of(rs)
        active = [p for p in pods if is_active(p)]
        ready = sum(1 for p in active if is_ready(p))
        status: dict[str, Any] = {"replicas": len(active), "fullyLabeledReplicas": len(active),
                                  "readyReplicas": ready, "availableReplicas": ready,
                                  "terminatingReplicas": sum(1 for p in pods if p["metadata"].get("deletionTimestamp")),
                                  "observedGeneration": rs["metadata"].get("generation", 1)}
        for k in ("readyReplicas", "availableReplicas", "terminatingReplicas"):
            if not status[k] and k != "terminatingReplicas":
                status.pop(k)
        if not status["terminatingReplicas"]:
            status.pop("terminatingReplicas")
        self._write_status("ReplicaSet", rs, status)

    # --- Deployment --------------------------------------------------------------------------------------------
    def _sync_deployment(self, ns: str, name: str) -> None:
        d = self._get("Deployment", ns, name)
        if d is None or d["metadata"].get("deletionTimestamp"):
            return
        spec = d.get("spec") or {}
        want = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        h = template_hash(template)
        rs_res = self.c.res("apps", "replicasets")
        rss = self._owned(("apps", "replicasets"), ns, d["metadata"]["uid"])
        new_rs = next((r for r in rss if (r["metadata"].get("labels") or {}).get("pod-template-hash") == h), None)
        old_rss = [r for r in rss if r is not new_rs]
        revisions = [int((r["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision", "0"))
                     for r in rss]
        strategy = spec.get("strategy") or {}
        rolling = strategy.get("type", "RollingUpdate") == "RollingUpdate"
        ru = strategy.get("rollingUpdate") or {}
        surge = _resolve(ru.get("maxSurge", "25%"), want, round_up=True) if rolling else 0
        unavailable = _resolve(ru.get("maxUnavailable", "25%"), want, round_up=False) if rolling else want
        if rolling and surge == 0 and unavailable == 0:
            unavailable = 1
        paused = bool(spec.get("paused"))
        if new_rs is None and not paused:
            tmpl = _copy(template)
            tmpl.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = h
            selector = _copy(spec.get("selector") or {})
            selector.setdefault("matchLabels", {})["pod-template-hash"] = h
            others = sum(int((r.get("spec") or {}).get("replicas", 0)) for r in old_rss)
            initial = want if not old_rss or others == 0 else 0
            if rolling and old_rss:
                initial = max(0, min(want, want + surge - others))
            elif not rolling and any(self._pods_of(r) for r in old_rss):
                initial = 0
            rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                  "metadata": {"name": f"{name}-{h}", "namespace": ns,
                               "labels": {**(template.get("metadata") or {}).get("labels", {}),
                                          "pod-template-hash": h},
                               "annotations": {"deployment.kubernetes.io/desired-replicas": str(want),
                                               "deployment.kubernetes.io/max-replicas": str(want + surge),
                                               "deployment.kubernetes.io/revision": str(max(revisions,
                                                                                             default=0) + 1)},
                               "ownerReferences": [owner_ref(d)]},
                  "spec": {"replicas": initial, "minReadySeconds": spec.get("minReadySeconds", 0),
                           "selector": selector, "template": tmpl}}
            try:
                self.api.create(rs_res, ns, rs, manager=MANAGER, internal=True)
            except errors.ApiError as exc:
                if exc.code != 409:
                    raise
            self.dirty.add(("Deployment", ns, name))
            return
        if new_rs is not None and not paused:
            def avail(r: dict[str, Any]) -> int:
                return int((r.get("status") or {}).get("availableReplicas", 0))

            def scale(r: dict[str, Any], n: int) -> None:
                if int((r.get("spec") or {}).get("replicas", 0)) == n and \
                        (r["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/desired-replicas") \
                        == str(want):
                    return
                nr = _copy(r)
                nr["spec"]["replicas"] = n
                ann = nr["metadata"].setdefault("annotations", {})
                ann["deployment.kubernetes.io/desired-replicas"] = str(want)
                ann["deployment.kubernetes.io/max-replicas"] = str(want + surge)
                self.api.update(rs_res, ns, r["metadata"]["name"], nr, manager=MANAGER)

            active_old = [r for r in old_rss if int((r.get("spec") or {}).get("replicas", 0)) > 0]
            if not active_old:
                scale(new_rs, want)
            elif not rolling:
                for r in active_old:
                    scale(r, 0)
                if not any(is_active(p) for r in old_rss for p in self._pods_of(r)):
                    scale(new_rs, want)
            else:
                total = sum(int((r.get("spec") or {}).get("replicas", 0)) for r in rss)
                new_count = int((new_rs.get("spec") or {}).get("replicas", 0))
                room = want + surge - total
                if room > 0 and new_count < want:
                    new_count = min(want, new_count + room)
                    scale(new_rs, new_count)
                min_avail = want - unavailable
                total_avail = sum(avail(r) for r in rss)
                can_remove = total_avail - min_avail
                for r in sorted(active_old, key=lambda x: x["metadata"].get("creationTimestamp", "")):
                    cur = int(r["spec"].get("replicas", 0))
                    unhealthy = max(0, cur - avail(r))
                    drop = min(cur, unhealthy + max(0, can_remove))
                    if drop > 0:
                        can_remove -= max(0, drop - unhealthy)
                        scale(r, cur - drop)
            # cleanup beyond revisionHistoryLimit
            limit = int(spec.get("revisionHistoryLimit", 10))
            idle = sorted((r for r in old_rss if int((r.get("spec") or {}).get("replicas", 0)) == 0
                           and not (r.get("status") or {}).get("replicas")),
                          key=lambda r: int((r["metadata"].get("annotations") or {})
                                            .get("deployment.kubernetes.io/revision", "0")))
            for r in idle[: max(0, len(idle) - limit)]:
                self.api.delete(rs_res, ns, r["metadata"]["name"])
        # status
        rss = self._owned(("apps", "replicasets"), ns, d["metadata"]["uid"])
        new_rs = next((r for r in rss if (r["metadata"].get("labels") or {}).get("pod-template-hash") == h), None)
        st = [r.get("status") or {} for r in rss]
        replicas = sum(int(s.get("replicas", 0)) for s in st)
        ready = sum(int(s.get("readyReplicas", 0)) for s in st)
        available = sum(int(s.get("availableReplicas", 0)) for s in st)
        updated = int((new_rs or {}).get("status", {}).get("replicas", 0)) if new_rs else 0
        old_conds = (d.get("status") or {}).get("conditions") or []
        min_ok = available >= want - unavailable
        complete = updated == want and replicas == want and available == want and new_rs is not None \
            and int((new_rs.get("status") or {}).get("observedGeneration", 0)) >= \
            int(new_rs["metadata"].get("generation", 1))
        rs_name = new_rs["metadata"]["name"] if new_rs else name
        conds = [
            _cond(old_conds, "Available", "True" if min_ok else "False",
                  "MinimumReplicasAvailable" if min_ok else "MinimumReplicasUnavailable",
                  "Deployment has minimum availability." if min_ok else
                  "Deployment does not have minimum availability.", update_time=True),
            _cond(old_conds, "Progressing", "True", "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                  f'ReplicaSet "{rs_name}" has successfully progressed.' if complete else
                  f'ReplicaSet "{rs_name}" is progressing.', update_time=True),
        ]
        status: dict[str, Any] = {"observedGeneration": d["metadata"].get("generation", 1), "replicas": replicas,
                                  "updatedReplicas": updated, "readyReplicas": ready,
                                  "availableReplicas": available,
                                  "unavailableReplicas": max(0, replicas - available) if replicas else 0,
                                  "conditions": conds}
        for k in ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas", "unavailableReplicas"):
            if not status[k]:
                status.pop(k)
        self._write_status("Deployment", d, status)

    # --- StatefulSet -------------------------------------------------------------------------------------------
    def _sync_statefulset(self, ns: str, name: str) -> None:
        sts = self._get("StatefulSet", ns, name)
        if sts is None or sts["metadata"].get("deletionTimestamp"):
            return
        spec = sts.get("spec") or {}
        want = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        rev = f"{name}-{template_hash(template)}"
        pods = {p["metadata"]["name"]: p for p in self._pods_of(sts)}
        parallel = spec.get("podManagementPolicy") == "Parallel"

        def ordinal_pod(i: int) -> dict[str, Any] | None:
            return pods.get(f"{name}-{i}")

        def mutate(i: int) -> Any:
            def fn(pod: dict[str, Any]) -> None:
                pod["spec"]["hostname"] = f"{name}-{i}"
                if spec.get("serviceName"):
                    pod["spec"]["subdomain"] = spec["serviceName"]
            return fn

        for i in range(want):
            p = ordinal_pod(i)
            if p is None:
                labels = {"statefulset.kubernetes.io/pod-name": f"{name}-{i}", "controller-revision-hash": rev,
                          "apps.kubernetes.io/pod-index": str(i)}
                self._create_pod(sts, template, name=f"{name}-{i}", extra_labels=labels, mutate=mutate(i))
                if not parallel:
                    break
                continue
            if not parallel and not (is_active(p) and is_ready(p)):
                break
        # scale down from the highest ordinal
        extra = sorted((p for n, p in pods.items() if _ordinal(n, name) >= want and is_active(p)),
                       key=lambda p: -_ordinal(p["metadata"]["name"], name))
        if extra:
            if parallel:
                for p in extra:
                    self._delete_pod(p)
            elif all(is_ready(p) or not is_active(p) for p in pods.values()):
                self._delete_pod(extra[0])
        # rolling update: highest ordinal first, one at a time
        if (spec.get("updateStrategy") or {}).get("type", "RollingUpdate") == "RollingUpdate":
            current = [pods.get(f"{name}-{i}") for i in range(want)]
            if all(p is not None and is_active(p) and is_ready(p) for p in current):
                for i in reversed(range(want)):
                    p = current[i]
                    if p is not None and (p["metadata"].get("labels") or {}).get("controller-revision-hash") != rev:
                        self._delete_pod(p)
                        break
        pods_list = [p for p in self._pods_of(sts) if is_active(p)]
        ready = sum(1 for p in pods_list if is_ready(p))
        updated = sum(1 for p in pods_list if (p["metadata"].get("labels") or {}).get("controller-revision-hash")
                      == rev)
        status: dict[str, Any] = {"observedGeneration": sts["metadata"].get("generation", 1),
                                  "replicas": len(pods_list), "readyReplicas": ready, "currentReplicas": updated,
                                  "updatedReplicas": updated, "availableReplicas": ready, "currentRevision": rev,
                                  "updateRevision": rev, "collisionCount": 0}
        for k in ("readyReplicas", "currentReplicas", "updatedReplicas"):
            if not status[k]:
                status.pop(k)
        self._write_status("StatefulSet", sts, status)

    # --- DaemonSet ---------------------------------------------------------------------------------------------
    def _sync_daemonset(self, ns: str, name: str) -> None:
        ds = self._get("DaemonSet", ns, name)
        if ds is None or ds["metadata"].get("deletionTimestamp"):
            return
        spec = ds.get("spec") or {}
        template = _copy(spec.get("template") or {})
        tspec = template.setdefault("spec", {})
        tols = tspec.setdefault("tolerations", [])
        for t in DS_TOLERATIONS:
            if t not in tols:
                tols.append(dict(t))
        rev = template_hash(spec.get("template") or {})
        pods = self._pods_of(ds)
        by_node: dict[str, list[dict[str, Any]]] = {}
        for p in pods:
            node = _ds_node(p)
            by_node.setdefault(node, []).append(p)
        desired = 0
        eligible_nodes = []
        for node_obj in self.api.list_objects(("", "nodes")):
            nname = node_obj["metadata"]["name"]
            has_pod = any(is_active(p) for p in by_node.get(nname, []))
            if self.c.scheduler.daemon_eligible(template, node_obj, running=has_pod):
                desired += 1
                eligible_nodes.append(nname)
                active = [p for p in by_node.get(nname, []) if is_active(p)]
                if not active and not any(p["metadata"].get("deletionTimestamp") for p in by_node.get(nname, [])):
                    def pin(pod: dict[str, Any], nname: str = nname) -> None:
                        aff = pod["spec"].setdefault("affinity", {}).setdefault("nodeAffinity", {})
                        aff["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": [
                            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [nname]}]}]}
                    self._create_pod(ds, template, generate=f"{name}-",
                                     extra_labels={"controller-revision-hash": rev, "pod-template-generation":
                                                   str(ds["metadata"].get("generation", 1))}, mutate=pin)
                elif len(active) > 1:
                    for p in active[1:]:
                        self._delete_pod(p)
            else:
                for p in by_node.get(nname, []):
                    if is_active(p):
                        self._delete_pod(p)
        # rolling update: replace one out-of-date ready pod at a time
        pods = self._pods_of(ds)
        active = [p for p in pods if is_active(p)]
        if all(is_ready(p) for p in active):
            stale = [p for p in active if (p["metadata"].get("labels") or {}).get("controller-revision-hash") != rev]
            if stale and (spec.get("updateStrategy") or {}).get("type", "RollingUpdate") == "RollingUpdate":
                self._delete_pod(stale[0])
        scheduled = [p for p in active if _ds_node(p) in eligible_nodes]
        ready = sum(1 for p in scheduled if is_ready(p))
        updated = sum(1 for p in scheduled
                      if (p["metadata"].get("labels") or {}).get("controller-revision-hash") == rev)
        status: dict[str, Any] = {"currentNumberScheduled": len(scheduled), "desiredNumberScheduled": desired,
                                  "numberMisscheduled": len(active) - len(scheduled), "numberReady": ready,
                                  "numberAvailable": ready, "updatedNumberScheduled": updated,
                                  "observedGeneration": ds["metadata"].get("generation", 1)}
        if desired - ready > 0:
            status["numberUnavailable"] = desired - ready
        if not ready:
            status.pop("numberAvailable")
        if not updated:
            status.pop("updatedNumberScheduled")
        self._write_status("DaemonSet", ds, status)

    # --- Job ---------------------------------------------------------------------------------------------------
    def _sync_job(self, ns: str, name: str) -> None:
        job = self._get("Job", ns, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        spec = job.get("spec") or {}
        completions = int(spec.get("completions", 1) or 1)
        parallelism = int(spec.get("parallelism", 1))
        pods = self._pods_of(job)
        succeeded = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Succeeded")
        failed = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Failed")
        active = [p for p in pods if is_active(p)]
        old = job.get("status") or {}
        done = any(c.get("type") == "Complete" and c.get("status") == "True" for c in old.get("conditions") or [])
        if not done and not spec.get("suspend"):
            need = min(parallelism, completions - succeeded) - len(active)
            for _ in range(max(0, need)):
                if not self._create_pod(job, spec.get("template") or {}, generate=f"{name}-",
                                        extra_labels={"batch.kubernetes.io/job-name": name, "job-name": name}):
                    break
        pods = self._pods_of(job)
        active = [p for p in pods if is_active(p)]
        now = apiserver.now_iso()
        status: dict[str, Any] = {"startTime": old.get("startTime", now), "active": len(active),
                                  "ready": sum(1 for p in active if is_ready(p)), "succeeded": succeeded,
                                  "failed": failed, "terminating": 0, "uncountedTerminatedPods": {}}
        for k in ("active", "succeeded", "failed"):
            if not status[k]:
                status.pop(k)
        conds = list(old.get("conditions") or [])
        if succeeded >= completions:
            if not done:
                conds = [_cond([], "SuccessCriteriaMet", "True", "CompletionsReached", "Reached expected number "
                               "of succeeded pods"),
                         _cond([], "Complete", "True", "CompletionsReached", "Reached expected number of succeeded "
                               "pods")]
                for c in conds:
                    c["lastProbeTime"] = now
            status["completionTime"] = old.get("completionTime", now)
        if conds:
            status["conditions"] = conds
        self._write_status("Job", job, status)


def _ordinal(pod_name: str, sts_name: str) -> int:
    suffix = pod_name[len(sts_name) + 1:]
    return int(suffix) if suffix.isdigit() else -1


def _ds_node(pod: dict[str, Any]) -> str:
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    terms = ((((spec.get("affinity") or {}).get("nodeAffinity") or {})
              .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or [])
    for t in terms:
        for f in t.get("matchFields") or []:
            if f.get("key") == "metadata.name" and f.get("values"):
                return str(f["values"][0])
    return ""
