"""Server-side printing (``meta.k8s.io/v1`` Table), which ``kubectl get`` relies on for its columns.

Columns follow the real printers for the kinds kubectl users look at; custom resources use their CRD's
``additionalPrinterColumns`` (simple JSONPaths) or NAME/AGE; other kinds get the server's default
NAME/CREATED AT.
"""

from __future__ import annotations

import datetime
from typing import Any

from sim import resources

_COLS: dict[str, list[tuple[str, str, int]]] = {
    "Pod": [("Name", "string", 0), ("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0),
            ("Age", "string", 0), ("IP", "string", 1), ("Node", "string", 1), ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1)],
    "Node": [("Name", "string", 0), ("Status", "string", 0), ("Roles", "string", 0), ("Age", "string", 0),
             ("Version", "string", 0), ("Internal-IP", "string", 1), ("External-IP", "string", 1),
             ("OS-Image", "string", 1), ("Kernel-Version", "string", 1), ("Container-Runtime", "string", 1)],
    "Deployment": [("Name", "string", 0), ("Ready", "string", 0), ("Up-to-date", "integer", 0),
                   ("Available", "integer", 0), ("Age", "string", 0), ("Containers", "string", 1),
                   ("Images", "string", 1), ("Selector", "string", 1)],
    "ReplicaSet": [("Name", "string", 0), ("Desired", "integer", 0), ("Current", "integer", 0),
                   ("Ready", "integer", 0), ("Age", "string", 0), ("Containers", "string", 1),
                   ("Images", "string", 1), ("Selector", "string", 1)],
    "StatefulSet": [("Name", "string", 0), ("Ready", "string", 0), ("Age", "string", 0),
                    ("Containers", "string", 1), ("Images", "string", 1)],
    "DaemonSet": [("Name", "string", 0), ("Desired", "integer", 0), ("Current", "integer", 0),
                  ("Ready", "integer", 0), ("Up-to-date", "integer", 0), ("Available", "integer", 0),
                  ("Node Selector", "string", 0), ("Age", "string", 0), ("Containers", "string", 1),
                  ("Images", "string", 1), ("Selector", "string", 1)],
    "Service": [("Name", "string", 0), ("Type", "string", 0), ("Cluster-IP", "string", 0),
                ("External-IP", "string", 0), ("Port(s)", "string", 0), ("Age", "string", 0),
                ("Selector", "string", 1)],
    "Namespace": [("Name", "string", 0), ("Status", "string", 0), ("Age", "string", 0)],
    "ConfigMap": [("Name", "string", 0), ("Data", "string", 0), ("Age", "string", 0)],
    "Secret": [("Name", "string", 0), ("Type", "string", 0), ("Data", "string", 0), ("Age", "string", 0)],
    "ServiceAccount": [("Name", "string", 0), ("Secrets", "string", 0), ("Age", "string", 0)],
    "Job": [("Name", "string", 0), ("Status", "string", 0), ("Completions", "string", 0),
            ("Duration", "string", 0), ("Age", "string", 0)],
    "Lease": [("Name", "string", 0), ("Holder", "string", 0), ("Age", "string", 0)],
    "PriorityClass": [("Name", "string", 0), ("Value", "integer", 0), ("Global-Default", "boolean", 0),
                      ("Age", "string", 0), ("Preemption Policy", "string", 0)],
    "CustomResourceDefinition": [("Name", "string", 0), ("Created At", "date", 0)],
    "Event": [("Last Seen", "string", 0), ("Type", "string", 0), ("Reason", "string", 0), ("Object", "string", 0),
              ("Message", "string", 0)],
}


def age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    try:
        then = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "<unknown>"
    secs = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    if secs < 0:
        return "<invalid>"
    if secs < 120:
        return f"{secs}s"
    mins = secs // 60
    if mins < 10:
        return f"{mins}m{secs % 60}s" if secs % 60 else f"{mins}m"
    if mins < 180:
        return f"{mins}m"
    hours = mins // 60
    if hours < 8:
        return f"{hours}h{mins % 60}m" if mins % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{hours // 24}d"


def _containers(spec: dict[str, Any]) -> tuple[str, str]:
    cs = spec.get("containers") or []
    return ",".join(c.get("name", "") for c in cs), ",".join(c.get("image", "") for c in cs)


def _tmpl(obj: dict[str, Any]) -> dict[str, Any]:
    return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}


def pod_status(pod: dict[str, Any]) -> str:
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Unknown"
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state and state["terminated"].get("reason"):
            reason = state["terminated"]["reason"]
    if status.get("phase") == "Succeeded":
        reason = "Completed"
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        reason = "Unknown" if status.get("reason") == "NodeLost" else "Terminating"
    return str(reason)


def _cells(kind: str, obj: dict[str, Any]) -> list[Any]:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    name = meta.get("name", "")
    a = age(meta.get("creationTimestamp"))
    if kind == "Pod":
        css = status.get("containerStatuses") or []
        ready = sum(1 for c in css if c.get("ready"))
        restarts = sum(int(c.get("restartCount", 0)) for c in css)
        return [name, f"{ready}/{len(spec.get('containers') or [])}", pod_status(obj), str(restarts), a,
                status.get("podIP") or "<none>", spec.get("nodeName") or "<none>",
                status.get("nominatedNodeName") or "<none>", "<none>"]
    if kind == "Node":
        conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        st = "Ready" if conds.get("Ready") == "True" else "NotReady"
        if spec.get("unschedulable"):
            st += ",SchedulingDisabled"
        roles = sorted(k.split("/", 1)[1] for k in (meta.get("labels") or {})
                       if k.startswith("node-role.kubernetes.io/"))
        info = status.get("nodeInfo") or {}
        ip = next((x.get("address") for x in status.get("addresses") or [] if x.get("type") == "InternalIP"),
                  "<none>")
        return [name, st, ",".join(roles) or "<none>", a, info.get("kubeletVersion", ""), ip, "<none>",
                info.get("osImage", ""), info.get("kernelVersion", ""), info.get("containerRuntimeVersion", "")]
    if kind == "Deployment":
        c, i = _containers(_tmpl(obj))
        sel = ",".join(f"{k}={v}" for k, v in ((spec.get("selector") or {}).get("matchLabels") or {}).items())
        return [name, f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
                status.get("updatedReplicas", 0), status.get("availableReplicas", 0), a, c, i, sel]
    if kind == "ReplicaSet":
        c, i = _containers(_tmpl(obj))
        sel = ",".join(f"{k}={v}" for k, v in ((spec.get("selector") or {}).get("matchLabels") or {}).items())
        return [name, spec.get("replicas", 1), status.get("replicas", 0), status.get("readyReplicas", 0), a, c, i,
                sel]
    if kind == "StatefulSet":
        c, i = _containers(_tmpl(obj))
        return [name, f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}", a, c, i]
    if kind == "DaemonSet":
        c, i = _containers(_tmpl(obj))
        ns_sel = ",".join(f"{k}={v}" for k, v in (_tmpl(obj).get("nodeSelector") or {}).items()) or "<none>"
        sel = ",".join(f"{k}={v}" for k, v in ((spec.get("selector") or {}).get("matchLabels") or {}).items())
        return [name, status.get("desiredNumberScheduled", 0), status.get("currentNumberScheduled", 0),
                status.get("numberReady", 0), status.get("updatedNumberScheduled", 0),
                status.get("numberAvailable", 0), ns_sel, a, c, i, sel]
    if kind == "Service":
        ports = ",".join(
            f"{p.get('port')}{':' + str(p['nodePort']) if p.get('nodePort') else ''}/{p.get('protocol', 'TCP')}"
            for p in spec.get("ports") or []) or "<none>"
        sel = ",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items()) or "<none>"
        ext = ",".join(spec.get("externalIPs") or []) or ("<pending>" if spec.get("type") == "LoadBalancer"
                                                         else "<none>")
        return [name, spec.get("type", "ClusterIP"), spec.get("clusterIP") or "<none>", ext, ports, a, sel]
    if kind == "Namespace":
        return [name, status.get("phase", "Active"), a]
    if kind == "ConfigMap":
        return [name, str(len(obj.get("data") or {}) + len(obj.get("binaryData") or {})), a]
    if kind == "Secret":
        return [name, obj.get("type", "Opaque"), str(len(obj.get("data") or {})), a]
    if kind == "ServiceAccount":
        return [name, str(len(obj.get("secrets") or [])), a]
    if kind == "Job":
        done = status.get("succeeded", 0)
        st = "Complete" if any(c.get("type") == "Complete" and c.get("status") == "True"
                               for c in status.get("conditions") or []) else "Running"
        return [name, st, f"{done}/{spec.get('completions', 1)}", "", a]
    if kind == "Lease":
        return [name, spec.get("holderIdentity", "<none>"), a]
    if kind == "PriorityClass":
        return [name, obj.get("value", 0), bool(obj.get("globalDefault", False)), a,
                obj.get("preemptionPolicy", "PreemptLowerPriority")]
    if kind == "CustomResourceDefinition":
        return [name, meta.get("creationTimestamp")]
    if kind == "Event":
        inv = obj.get("involvedObject") or {}
        return [age(obj.get("lastTimestamp") or meta.get("creationTimestamp")), obj.get("type", ""),
                obj.get("reason", ""), f"{str(inv.get('kind', '')).lower()}/{inv.get('name', '')}",
                obj.get("message", "")]
    return [name, meta.get("creationTimestamp")]


def _jsonpath(obj: Any, path: str) -> Any:
    cur = obj
    for part in path.strip().lstrip(".").split("."):
        if not part:
            continue
        idx = None
        if part.endswith("]") and "[" in part:
            part, _, rest = part.partition("[")
            idx = rest[:-1]
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
        if idx is not None:
            if not isinstance(cur, list):
                return None
            if idx.isdigit():
                cur = cur[int(idx)] if int(idx) < len(cur) else None
            elif idx.startswith("?(@.") and "==" in idx:
                field, _, want = idx[4:-1].partition("==")
                want = want.strip().strip("\"'")
                cur = next((x for x in cur if isinstance(x, dict) and str(x.get(field.strip())) == want), None)
    return cur


def table(res: resources.Resource, objs: list[dict[str, Any]], *, include: str = "Metadata",
          printer_columns: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rows = []
    if res.custom:
        extra = printer_columns or []
        cols = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
        cols += [{"name": c.get("name", ""), "type": c.get("type", "string"), "format": c.get("format", ""),
                  "description": c.get("description", ""), "priority": int(c.get("priority", 0))} for c in extra]
        if not any(c.get("name") == "Age" for c in extra):
            cols.append({"name": "Age", "type": "date", "format": "", "description": "", "priority": 0})
        for obj in objs:
            cells: list[Any] = [(obj.get("metadata") or {}).get("name", "")]
            for c in extra:
                v = _jsonpath(obj, c.get("jsonPath", ""))
                if c.get("type") == "date" and isinstance(v, str):
                    v = age(v)
                cells.append(v)
            if not any(c.get("name") == "Age" for c in extra):
                cells.append(age((obj.get("metadata") or {}).get("creationTimestamp")))
            rows.append(_row(cells, obj, include))
    else:
        spec = _COLS.get(res.kind, [("Name", "string", 0), ("Created At", "date", 0)])
        cols = [{"name": n, "type": t, "format": "name" if n == "Name" else "", "description": "",
                 "priority": p} for n, t, p in spec]
        for obj in objs:
            rows.append(_row(_cells(res.kind, obj), obj, include))
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "columnDefinitions": cols,
            "rows": rows}


def _row(cells: list[Any], obj: dict[str, Any], include: str) -> dict[str, Any]:
    row: dict[str, Any] = {"cells": cells}
    if include == "Object":
        row["object"] = obj
    elif include != "None":
        meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
        row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
    return row
