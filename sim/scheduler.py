"""The scheduler: filters, scores, binds, and preempts like kube-scheduler's default profile (a subset).

Filters: node Ready/unschedulable via taints, resource requests (cpu, memory, pod count) against allocatable
minus the requests of every non-terminal pod bound there (terminating pods still count, as they do for real),
nodeSelector, required node affinity (incl. matchFields), taints/tolerations (NoSchedule, NoExecute), required
pod anti-affinity. Scores: least allocated, preferred pod anti-affinity. Pending pods are tried in priority
order; a pod that fits nowhere gets ``PodScheduled=False`` reason ``Unschedulable`` with the real-style
"0/3 nodes are available: ..." message, and if its preemptionPolicy allows, lower-priority pods on the best
candidate node are evicted (gracefully) and the pod is nominated there.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from sim import apiserver, errors, quantity, selectors

if TYPE_CHECKING:
    from sim.cluster import Cluster


def tolerates(tol: dict[str, Any], taint: dict[str, Any]) -> bool:
    effect = tol.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    op = tol.get("operator") or "Equal"
    key = tol.get("key") or ""
    if not key:
        return op == "Exists"
    if key != taint.get("key"):
        return False
    return op == "Exists" or (tol.get("value") or "") == (taint.get("value") or "")


def pod_requests(spec: dict[str, Any]) -> tuple[float, float]:
    cpu = mem = 0.0
    for c in spec.get("containers") or []:
        req = (c.get("resources") or {}).get("requests") or (c.get("resources") or {}).get("limits") or {}
        cpu += quantity.parse(req.get("cpu", 0))
        mem += quantity.parse(req.get("memory", 0))
    for c in spec.get("initContainers") or []:
        req = (c.get("resources") or {}).get("requests") or {}
        cpu = max(cpu, quantity.parse(req.get("cpu", 0)))
        mem = max(mem, quantity.parse(req.get("memory", 0)))
    overhead = spec.get("overhead") or {}
    return cpu + quantity.parse(overhead.get("cpu", 0)), mem + quantity.parse(overhead.get("memory", 0))


def _expr_match(expr: dict[str, Any], value: str | None) -> bool:
    op = expr.get("operator")
    values = expr.get("values") or []
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and values:
        try:
            v, ref = int(value), int(values[0])
        except ValueError:
            return False
        return v > ref if op == "Gt" else v < ref
    return False


def node_affinity_ok(spec: dict[str, Any], node: dict[str, Any]) -> bool:
    labels = node["metadata"].get("labels") or {}
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    req = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    if not req:
        return True
    for term in req.get("nodeSelectorTerms") or []:
        exprs = term.get("matchExpressions") or []
        fields = term.get("matchFields") or []
        if not exprs and not fields:
            continue
        if all(_expr_match(e, labels.get(e.get("key", ""))) for e in exprs) and all(
                _expr_match(f, node["metadata"]["name"] if f.get("key") == "metadata.name" else None)
                for f in fields):
            return True
    return False


def untolerated(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any] | None:
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(tolerates(t, taint) for t in spec.get("tolerations") or []):
            return dict(taint)
    return None


class Scheduler:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self._messages: dict[str, str] = {}

    def daemon_eligible(self, template: dict[str, Any], node: dict[str, Any], *, running: bool = False) -> bool:
        """Should a daemon pod run on ``node``? A pod already there only has to tolerate NoExecute taints
        (the DaemonSet controller's shouldContinueRunning), so unreachable nodes keep their daemon pods."""
        spec = template.get("spec") or {}
        if not node_affinity_ok(spec, node):
            return False
        taint = untolerated(spec, node)
        return taint is None or (running and taint.get("effect") == "NoSchedule" and not any(
            t.get("effect") == "NoExecute" and not any(tolerates(x, t) for x in spec.get("tolerations") or [])
            for t in (node.get("spec") or {}).get("taints") or []))

    def _usage(self, pods: list[dict[str, Any]]) -> dict[str, list[float]]:
        used: dict[str, list[float]] = {}
        for p in pods:
            node = (p.get("spec") or {}).get("nodeName")
            if not node or (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            cpu, mem = pod_requests(p.get("spec") or {})
            u = used.setdefault(node, [0.0, 0.0, 0.0])
            u[0] += cpu
            u[1] += mem
            u[2] += 1
        return used

    @staticmethod
    def _alloc(node: dict[str, Any]) -> tuple[float, float, float]:
        a = (node.get("status") or {}).get("allocatable") or {}
        return quantity.parse(a.get("cpu", 0)), quantity.parse(a.get("memory", 0)), quantity.parse(a.get("pods", 0))

    def _anti_affinity(self, pod: dict[str, Any], node: dict[str, Any], pods: list[dict[str, Any]],
                       nodes: dict[str, dict[str, Any]]) -> tuple[bool, int]:
        """(required terms satisfied, preferred penalty) for placing ``pod`` on ``node``."""
        aff = ((pod.get("spec") or {}).get("affinity") or {}).get("podAntiAffinity") or {}
        ns = pod["metadata"].get("namespace")
        ok = True
        penalty = 0

        def peers(term: dict[str, Any]) -> int:
            reqs = selectors.from_label_selector(term.get("labelSelector")) or []
            if not term.get("labelSelector"):
                return 0
            key = term.get("topologyKey") or "kubernetes.io/hostname"
            value = (node["metadata"].get("labels") or {}).get(key)
            namespaces = term.get("namespaces") or [ns]
            count = 0
            for p in pods:
                pn = (p.get("spec") or {}).get("nodeName")
                if not pn or p is pod or p["metadata"].get("deletionTimestamp"):
                    continue
                if p["metadata"].get("namespace") not in namespaces:
                    continue
                other = nodes.get(pn)
                if other is None or (other["metadata"].get("labels") or {}).get(key) != value:
                    continue
                if selectors.match_labels(reqs, p["metadata"].get("labels")):
                    count += 1
            return count

        for term in aff.get("requiredDuringSchedulingIgnoredDuringExecution") or []:
            if peers(term):
                ok = False
        for wterm in aff.get("preferredDuringSchedulingIgnoredDuringExecution") or []:
            penalty += int(wterm.get("weight", 1)) * peers(wterm.get("podAffinityTerm") or {})
        return ok, penalty

    def _filter(self, pod: dict[str, Any], node: dict[str, Any], used: dict[str, list[float]],
                pods: list[dict[str, Any]], nodes: dict[str, dict[str, Any]],
                reasons: Counter[str] | None) -> bool:
        spec = pod.get("spec") or {}
        name = node["metadata"]["name"]
        if (node.get("spec") or {}).get("unschedulable") and not any(
                tolerates(t, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"})
                for t in spec.get("tolerations") or []):
            if reasons is not None:
                reasons["node(s) were unschedulable"] += 1
            return False
        if not node_affinity_ok(spec, node):
            if reasons is not None:
                reasons["node(s) didn't match Pod's node affinity/selector"] += 1
            return False
        taint = untolerated(spec, node)
        if taint is not None:
            if reasons is not None:
                value = f": {taint.get('value')}" if taint.get("value") else ": "
                reasons[f"node(s) had untolerated taint {{{taint.get('key')}{value}}}"] += 1
            return False
        if not self._fits(spec, node, used.get(name, [0.0, 0.0, 0.0]), reasons):
            return False
        ok, _ = self._anti_affinity(pod, node, pods, nodes)
        if not ok:
            if reasons is not None:
                reasons["node(s) didn't match pod anti-affinity rules"] += 1
            return False
        return True

    def _fits(self, spec: dict[str, Any], node: dict[str, Any], u: list[float],
              reasons: Counter[str] | None) -> bool:
        cpu, mem = pod_requests(spec)
        acpu, amem, apods = self._alloc(node)
        fits = True
        if u[2] + 1 > apods:
            fits = False
            if reasons is not None:
                reasons["Too many pods"] += 1
        if cpu and u[0] + cpu > acpu + 1e-9:
            fits = False
            if reasons is not None:
                reasons["Insufficient cpu"] += 1
        if mem and u[1] + mem > amem:
            fits = False
            if reasons is not None:
                reasons["Insufficient memory"] += 1
        return fits

    def run(self) -> None:
        pods = [e.obj for e in self.c.store.iter(("", "pods"))]
        nodes = {n["metadata"]["name"]: n for n in self.c.api.list_objects(("", "nodes"))}
        used = self._usage(pods)
        pending = [p for p in pods if not (p.get("spec") or {}).get("nodeName")
                   and not p["metadata"].get("deletionTimestamp")
                   and (p.get("spec") or {}).get("schedulerName", "default-scheduler") == "default-scheduler"
                   and not (p.get("spec") or {}).get("schedulingGates")]
        pending.sort(key=lambda p: (-int((p.get("spec") or {}).get("priority", 0)),
                                    p["metadata"].get("creationTimestamp", "")))
        # Pods nominated by preemption reserve their node against pods of lower or equal priority, so the
        # capacity freed for them is not taken by someone else meanwhile (as kube-scheduler does).
        nominated: dict[str, list[tuple[int, float, float, str]]] = {}
        for p in pending:
            nn = (p.get("status") or {}).get("nominatedNodeName")
            if nn:
                cpu, mem = pod_requests(p.get("spec") or {})
                nominated.setdefault(nn, []).append((int(p["spec"].get("priority", 0)), cpu, mem,
                                                     p["metadata"].get("uid", "")))
        for pod in pending:
            reasons: Counter[str] = Counter()
            prio = int((pod.get("spec") or {}).get("priority", 0))
            view = used
            if nominated:
                view = {k: list(v) for k, v in used.items()}
                for nn, entries in nominated.items():
                    u = view.setdefault(nn, [0.0, 0.0, 0.0])
                    for eprio, cpu, mem, uid in entries:
                        if eprio >= prio and uid != pod["metadata"].get("uid"):
                            u[0] += cpu
                            u[1] += mem
                            u[2] += 1
            feasible = [n for n in nodes.values() if self._filter(pod, n, view, pods, nodes, reasons)]
            if feasible:
                best = min(feasible, key=lambda n: self._score(pod, n, view, pods, nodes))
                name = best["metadata"]["name"]
                self._bind(pod, name)
                cpu, mem = pod_requests(pod.get("spec") or {})
                u = used.setdefault(name, [0.0, 0.0, 0.0])
                u[0] += cpu
                u[1] += mem
                u[2] += 1
                pod["spec"] = dict(pod.get("spec") or {}, nodeName=name)
                for entries in nominated.values():
                    entries[:] = [e for e in entries if e[3] != pod["metadata"].get("uid")]
                continue
            nominee = self._preempt(pod, nodes, used, pods)
            msg = f"0/{len(nodes)} nodes are available: " + ", ".join(
                f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda x: x[0])) + "."
            if nominee:
                msg += f" preemption: nominated node {nominee}."
            else:
                msg += " preemption: 0/{0} nodes are available: {0} Preemption is not helpful for " \
                       "scheduling.".format(len(nodes))
            self._unschedulable(pod, msg, nominee)

    def _score(self, pod: dict[str, Any], node: dict[str, Any], used: dict[str, list[float]],
               pods: list[dict[str, Any]], nodes: dict[str, dict[str, Any]]) -> tuple[float, float, str]:
        u = used.get(node["metadata"]["name"], [0.0, 0.0, 0.0])
        acpu, amem, _ = self._alloc(node)
        cpu, mem = pod_requests(pod.get("spec") or {})
        load = ((u[0] + cpu) / acpu if acpu else 0) + ((u[1] + mem) / amem if amem else 0) + u[2] / 110
        _, penalty = self._anti_affinity(pod, node, pods, nodes)
        return (penalty, load, node["metadata"]["name"])

    def _bind(self, pod: dict[str, Any], node: str) -> None:
        self.bind(pod["metadata"]["namespace"], pod["metadata"]["name"], node)

    def bind(self, ns: str, name: str, node: str) -> None:
        res = self.c.res("", "pods")
        cur = self.c.api.get(res.storage_key, ns, name)
        if cur is None:
            raise errors.not_found("pods", name)
        if (cur.get("spec") or {}).get("nodeName"):
            raise errors.ApiError(409, f'Operation cannot be fulfilled on pods/binding "{name}": pod {name} is '
                                       f"already assigned to node \"{cur['spec']['nodeName']}\"", reason="Conflict")
        new = json.loads(json.dumps(cur))
        new["spec"]["nodeName"] = node
        now = apiserver.now_iso()
        conds = [c for c in new.get("status", {}).get("conditions") or [] if c.get("type") != "PodScheduled"]
        conds.append({"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": now})
        new.setdefault("status", {})["conditions"] = conds
        new["status"].pop("nominatedNodeName", None)
        # Binding sets spec.nodeName (a real server does this through pods/binding, not an update).
        self.c.api.store.put(res.storage_key, new)
        self._messages.pop(f"{ns}/{name}", None)
        self.c.controllers._event(new, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to {node}",
                                  component="default-scheduler")

    def _unschedulable(self, pod: dict[str, Any], message: str, nominated: str) -> None:
        key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        if self._messages.get(key) == message:
            return
        self._messages[key] = message
        new = json.loads(json.dumps(pod))
        status = new.setdefault("status", {})
        now = apiserver.now_iso()
        conds = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        conds.append({"type": "PodScheduled", "status": "False", "lastProbeTime": None, "lastTransitionTime": now,
                      "reason": "Unschedulable", "message": message})
        status["conditions"] = conds
        if nominated:
            status["nominatedNodeName"] = nominated
        res = self.c.res("", "pods")
        try:
            self.c.api.update(res, pod["metadata"]["namespace"], pod["metadata"]["name"], new,
                              manager="default-scheduler", subresource="status")
        except errors.ApiError:
            self._messages.pop(key, None)
        self.c.controllers._event(pod, "Warning", "FailedScheduling", message, component="default-scheduler")

    def _preempt(self, pod: dict[str, Any], nodes: dict[str, dict[str, Any]], used: dict[str, list[float]],
                 pods: list[dict[str, Any]]) -> str:
        spec = pod.get("spec") or {}
        if spec.get("preemptionPolicy") == "Never":
            return ""
        prio = int(spec.get("priority", 0))
        best: tuple[int, int, str] | None = None
        best_victims: list[dict[str, Any]] = []
        for name, node in nodes.items():
            if not node_affinity_ok(spec, node) or untolerated(spec, node) is not None:
                continue
            on_node = [p for p in pods if (p.get("spec") or {}).get("nodeName") == name
                       and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
            if any(p["metadata"].get("deletionTimestamp") and int((p.get("spec") or {}).get("priority", 0)) < prio
                   for p in on_node):
                # victims already terminating here: wait for them rather than evicting more
                return name
            lower = sorted((p for p in on_node if int((p.get("spec") or {}).get("priority", 0)) < prio
                            and not p["metadata"].get("deletionTimestamp")),
                           key=lambda p: int((p.get("spec") or {}).get("priority", 0)))
            u = list(used.get(name, [0.0, 0.0, 0.0]))
            victims: list[dict[str, Any]] = []
            for v in lower:
                if self._fits(spec, node, u, None):
                    break
                cpu, mem = pod_requests(v.get("spec") or {})
                u[0] -= cpu
                u[1] -= mem
                u[2] -= 1
                victims.append(v)
            if not self._fits(spec, node, u, None) or not victims:
                continue
            top = max(int((v.get("spec") or {}).get("priority", 0)) for v in victims)
            cand = (top, len(victims), name)
            if best is None or cand < best:
                best, best_victims = cand, victims
        if best is None:
            return ""
        for v in best_victims:
            self.c.log(f"preempting {v['metadata']['namespace']}/{v['metadata']['name']} (priority "
                       f"{(v.get('spec') or {}).get('priority', 0)}) for {pod['metadata']['namespace']}/"
                       f"{pod['metadata']['name']} (priority {prio}) on {best[2]}")
            new = json.loads(json.dumps(v))
            conds = [c for c in new.get("status", {}).get("conditions") or [] if c.get("type") != "DisruptionTarget"]
            conds.append({"type": "DisruptionTarget", "status": "True", "lastProbeTime": None,
                          "lastTransitionTime": apiserver.now_iso(), "reason": "PreemptionByScheduler",
                          "message": "default-scheduler: preempting to accommodate a higher priority pod"})
            new.setdefault("status", {})["conditions"] = conds
            res = self.c.res("", "pods")
            self.c.api.update(res, v["metadata"]["namespace"], v["metadata"]["name"], new,
                              manager="default-scheduler", subresource="status")
            self.c.api.delete(res, v["metadata"]["namespace"], v["metadata"]["name"])
        return best[2]
