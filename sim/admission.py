"""Defaulting and built-in admission plugins, as a k3s 1.33 API server runs them.

Modelled: API defaulting of the kinds the platform uses; Service ClusterIP/NodePort allocation; Priority
(priorityClassName -> priority, globalDefault, 403 on an unknown class); DefaultTolerationSeconds (every pod
tolerates not-ready/unreachable NoExecute for 300 s unless it says otherwise); ServiceAccount (403 when the
pod's service account does not exist, so controllers retry like the real ones); Namespace lifecycle labels.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import uuid
from typing import TYPE_CHECKING, Any

from sim import errors, resources

if TYPE_CHECKING:
    from sim.apiserver import ApiServer

DEFAULT_TOLERATION_SECONDS = 300
_SERVICE_NET = ipaddress.ip_network("10.43.0.0/16")
_ip_counter = itertools.count(10)
_nodeport_counter = itertools.count(30000)


def _image_pull_policy(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    if "@" in last:
        return "IfNotPresent"
    if ":" not in last or last.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


def _default_containers(spec: dict[str, Any]) -> None:
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or []:
            c.setdefault("imagePullPolicy", _image_pull_policy(c.get("image", "")))
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("resources", {})
            for p in c.get("ports") or []:
                p.setdefault("protocol", "TCP")


def _default_pod_spec(spec: dict[str, Any]) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    _default_containers(spec)


def _shown_name(meta: dict[str, Any]) -> str:
    """Admission errors name a generated pod by its generateName prefix (``web-5d4b9c8c7b-``), as for real."""
    name, prefix = meta.get("name", ""), meta.get("generateName", "")
    return str(prefix if prefix and name.startswith(prefix) else name)


def _priority(api: ApiServer, spec: dict[str, Any], name: str) -> None:
    pc_name = spec.get("priorityClassName")
    if pc_name:
        pc = api.get(("scheduling.k8s.io", "priorityclasses"), "", pc_name)
        if pc is None:
            raise errors.ApiError(403, f'pods "{name}" is forbidden: no PriorityClass with name {pc_name} was found',
                                  details={"name": name, "kind": "pods"})
        spec["priority"] = int(pc.get("value", 0))
        spec.setdefault("preemptionPolicy", pc.get("preemptionPolicy", "PreemptLowerPriority"))
        return
    for pc in api.list_objects(("scheduling.k8s.io", "priorityclasses")):
        if pc.get("globalDefault"):
            spec["priorityClassName"] = pc["metadata"]["name"]
            spec["priority"] = int(pc.get("value", 0))
            spec.setdefault("preemptionPolicy", pc.get("preemptionPolicy", "PreemptLowerPriority"))
            return
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")


def _default_tolerations(spec: dict[str, Any]) -> None:
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        covered = any(
            (t.get("key") in (key, None, "") and t.get("operator") == "Exists" and not t.get("key"))
            or (t.get("key") == key and t.get("effect") in ("NoExecute", None, ""))
            for t in tolerations
        )
        if not covered:
            tolerations.append({"key": key, "operator": "Exists", "effect": "NoExecute",
                                "tolerationSeconds": DEFAULT_TOLERATION_SECONDS})


def _qos(spec: dict[str, Any]) -> str:
    requests_any = False
    guaranteed = True
    for c in spec.get("containers") or []:
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        if req or lim:
            requests_any = True
        for r in ("cpu", "memory"):
            if r not in lim or (r in req and req[r] != lim[r]):
                guaranteed = False
    if not requests_any:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def mutate(api: ApiServer, res: resources.Resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    kind = res.kind if not res.custom else ""
    meta = obj.setdefault("metadata", {})
    spec = obj.get("spec")
    if kind == "Pod" and old is None:
        spec = obj.setdefault("spec", {})
        _default_pod_spec(spec)
        spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("enableServiceLinks", True)
        _priority(api, spec, _shown_name(meta))
        _default_tolerations(spec)
        status = obj.setdefault("status", {})
        status.setdefault("phase", "Pending")
        status["qosClass"] = _qos(spec)
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job") and isinstance(spec, dict):
        tmpl = spec.setdefault("template", {})
        _default_pod_spec(tmpl.setdefault("spec", {}))
        if kind in ("Deployment", "StatefulSet", "ReplicaSet"):
            spec.setdefault("replicas", 1)
        if kind == "Deployment":
            spec.setdefault("strategy", {"type": "RollingUpdate",
                                         "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("progressDeadlineSeconds", 600)
        elif kind == "StatefulSet":
            spec.setdefault("podManagementPolicy", "OrderedReady")
            spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("persistentVolumeClaimRetentionPolicy", {"whenDeleted": "Retain", "whenScaled": "Retain"})
        elif kind == "DaemonSet":
            spec.setdefault("updateStrategy", {"type": "RollingUpdate",
                                               "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
            spec.setdefault("revisionHistoryLimit", 10)
        elif kind == "Job":
            spec.setdefault("parallelism", 1)
            spec.setdefault("completions", 1)
            spec.setdefault("backoffLimit", 6)
            spec.setdefault("completionMode", "NonIndexed")
            spec.setdefault("suspend", False)
            if old is None and "selector" not in spec:
                uid = meta.get("uid") or str(uuid.uuid4())
                spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
                labels = tmpl.setdefault("metadata", {}).setdefault("labels", {})
                labels.setdefault("batch.kubernetes.io/controller-uid", uid)
                labels.setdefault("controller-uid", uid)
                labels.setdefault("batch.kubernetes.io/job-name", meta.get("name", ""))
                labels.setdefault("job-name", meta.get("name", ""))
            tmpl["spec"].setdefault("restartPolicy", "Never")
    elif kind == "Service":
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if old is not None and (old.get("spec") or {}).get("clusterIP"):
            spec.setdefault("clusterIP", old["spec"]["clusterIP"])
            spec.setdefault("clusterIPs", old["spec"].get("clusterIPs", [old["spec"]["clusterIP"]]))
        if spec["type"] != "ExternalName":
            if not spec.get("clusterIP"):
                spec["clusterIP"] = str(_SERVICE_NET[next(_ip_counter)])
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        old_ports = {(p.get("port"), p.get("protocol", "TCP")): p for p in ((old or {}).get("spec") or {})
                     .get("ports") or []}
        for p in spec.get("ports") or []:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
            if spec["type"] in ("NodePort", "LoadBalancer") and not p.get("nodePort"):
                prev = old_ports.get((p.get("port"), p["protocol"]), {}).get("nodePort")
                p["nodePort"] = prev or next(_nodeport_counter)
        obj.setdefault("status", {}).setdefault("loadBalancer", {})
    elif kind == "Namespace":
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta.get("name", "")
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {}).setdefault("phase", "Active")
    elif kind == "Secret":
        obj.setdefault("type", "Opaque")
        string_data = obj.pop("stringData", None)
        if string_data:
            data = obj.setdefault("data", {})
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
    elif kind == "PriorityClass":
        obj.setdefault("preemptionPolicy", "PreemptLowerPriority")
    elif kind == "CustomResourceDefinition" and isinstance(spec, dict):
        spec.setdefault("conversion", {"strategy": "None"})
        obj.setdefault("status", {}).setdefault("conditions", [])


def admit(api: ApiServer, res: resources.Resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    if res.custom or old is not None or res.kind != "Pod":
        return
    meta = obj["metadata"]
    sa = (obj.get("spec") or {}).get("serviceAccountName") or "default"
    if api.get(("", "serviceaccounts"), meta.get("namespace", ""), sa) is None:
        raise errors.ApiError(
            403, f'pods "{_shown_name(meta)}" is forbidden: error looking up service account '
            f'{meta.get("namespace", "")}/{sa}: serviceaccount "{sa}" not found',
            details={"name": meta.get("name", ""), "kind": "pods"})
