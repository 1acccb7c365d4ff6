"""Turn a component's bundle objects into what the installer applies.

Rendering is a pure function of (object, component, bundle, tier policy): the same bundle
always renders the same objects, so the inventory can be computed before anything is applied
and a resumed run applies exactly what the interrupted one would have.

What rendering does:

* namespaced objects without ``metadata.namespace`` go to the component's namespace (a
  cluster-scoped object never gets one; scope comes from a table of built-in kinds plus the
  CRDs the bundle itself carries, so no API round-trip is needed);
* the lead's labels (``app.kubernetes.io/managed-by``, ``edgefleet.io/component|layer|tier|bundle``)
  on every object, and ``component``/``tier`` on pod templates;
* the tier's placement policy (:func:`agent.placement.patch`), whose change codes come back
  with the object so the caller records them (:attr:`model.Unit.placement`, then the cache and
  the inventory ConfigMap).

The live replica count of a workload scaled by the degradation controller is substituted at
apply time (:func:`keep_live_replicas`), not here: it is cluster state, not bundle content.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from agent import placement
from agent.install import model

CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace", "Node", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
        "StorageClass", "PriorityClass", "APIService", "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
        "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding", "CSIDriver", "CSINode", "VolumeAttachment",
        "RuntimeClass", "IngressClass", "CertificateSigningRequest", "FlowSchema", "PriorityLevelConfiguration",
        "PodSecurityPolicy", "SecurityContextConstraints", "GatewayClass", "ClusterIssuer", "ClusterPolicy",
        "ClusterSecretStore", "ClusterExternalSecret", "ClusterWorkflowTemplate", "VolumeSnapshotClass",
        "VolumeSnapshotContent", "IPAddress", "ServiceCIDR", "DeviceClass",
    }
)

#: The API groups Kubernetes itself serves: objects of any other group are custom resources,
#: whose scope only their CRD knows (:func:`is_custom`).
BUILTIN_GROUPS = frozenset(
    {
        "", "apps", "batch", "autoscaling", "policy", "admissionregistration.k8s.io", "apiextensions.k8s.io",
        "apiregistration.k8s.io", "authentication.k8s.io", "authorization.k8s.io", "certificates.k8s.io",
        "coordination.k8s.io", "discovery.k8s.io", "events.k8s.io", "flowcontrol.apiserver.k8s.io",
        "internal.apiserver.k8s.io", "networking.k8s.io", "node.k8s.io", "rbac.authorization.k8s.io",
        "resource.k8s.io", "scheduling.k8s.io", "storage.k8s.io", "storagemigration.k8s.io",
    }
)

#: Apply order inside one component (after Namespaces and CRDs, which come first anyway).
KIND_ORDER = (
    "Namespace", "CustomResourceDefinition", "PriorityClass", "StorageClass", "ServiceAccount", "Secret",
    "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "PersistentVolumeClaim",
    "Service", "DaemonSet", "Deployment", "StatefulSet", "Job", "CronJob", "PodDisruptionBudget",
    "NetworkPolicy", "APIService", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
)

_POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def crd_scopes(objects: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], bool]:
    """(group, kind) → namespaced, for the CRDs among ``objects``."""
    scopes: dict[tuple[str, str], bool] = {}
    for obj in objects:
        if obj.get("kind") != "CustomResourceDefinition":
            continue
        spec = obj.get("spec") or {}
        kind = str((spec.get("names") or {}).get("kind", ""))
        scopes[(str(spec.get("group", "")), kind)] = spec.get("scope", "Namespaced") == "Namespaced"
    return scopes


def is_namespaced(obj: Mapping[str, Any], crds: Mapping[tuple[str, str], bool]) -> bool:
    kind = str(obj.get("kind", ""))
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    if (group, kind) in crds:
        return crds[(group, kind)]
    return kind not in CLUSTER_SCOPED_KINDS


def is_custom(obj: Mapping[str, Any]) -> bool:
    """Whether ``obj`` is of an API group Kubernetes does not serve itself (a CRD's)."""
    return str(obj.get("apiVersion", "")).rpartition("/")[0] not in BUILTIN_GROUPS


def kind_order(kind: str) -> int:
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def order_key(obj: Mapping[str, Any]) -> int:
    return kind_order(str(obj.get("kind", "")))


def key_order(key: str) -> int:
    """:func:`order_key` of an object known only by its :attr:`model.Ref.key` (the kind is in it)."""
    return kind_order(model.Ref.parse(key).kind)


def render(
    obj: Mapping[str, Any],
    *,
    unit: model.Unit,
    bundle_label: str,
    policy: Any,
    crds: Mapping[tuple[str, str], bool],
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The rendered object and the placement change codes (empty: not a workload, or it conformed)."""
    out = dict(obj)  # a shallow copy: callers hand over freshly parsed objects
    meta = out["metadata"] = dict(out.get("metadata") or {})
    if is_namespaced(out, crds):
        if not meta.get("namespace"):
            meta["namespace"] = unit.namespace or "default"
    else:
        meta.pop("namespace", None)
    meta.pop("resourceVersion", None)
    meta.pop("uid", None)
    meta.pop("creationTimestamp", None)
    out.pop("status", None)
    labels = meta.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    meta["labels"] = {**labels, **object_labels(unit=unit, bundle_label=bundle_label)}
    path = _POD_TEMPLATE_PATHS.get(str(out.get("kind", "")))
    if path is not None:
        node: dict[str, Any] = out
        for key in path:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        tmeta = node.setdefault("metadata", {})
        tlabels = tmeta.get("labels") if isinstance(tmeta.get("labels"), dict) else {}
        tmeta["labels"] = {**tlabels, model.LABEL_COMPONENT: unit.name, model.LABEL_TIER: str(unit.tier)}
    if policy is None:
        return out, ()
    return placement.patch(out, tier=unit.tier, policy=policy)


def object_labels(*, unit: model.Unit, bundle_label: str) -> dict[str, str]:
    return {
        model.LABEL_MANAGED_BY: model.MANAGED_BY,
        model.LABEL_COMPONENT: unit.name,
        model.LABEL_LAYER: str(unit.layer),
        model.LABEL_TIER: str(unit.tier),
        model.LABEL_BUNDLE: bundle_label,
    }


def keep_live_replicas(obj: dict[str, Any], live: Mapping[str, Any] | None) -> dict[str, Any]:
    """Apply with the live ``spec.replicas`` while the degradation controller owns the count.

    The lead's contract: while ``edgefleet.io/original-replicas`` is on the live object, the
    installer (apply and drift repair) must not change ``spec.replicas``; dropping the field
    from an apply would not do (the server would then reset it to its default), so the live
    value is written back instead. The bundle's own count is what the annotation records.
    """
    if live is None or obj.get("kind") not in ("Deployment", "StatefulSet", "ReplicaSet"):
        return obj
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    if model.ANNOTATION_ORIGINAL_REPLICAS not in annotations:
        return obj
    replicas = (live.get("spec") or {}).get("replicas")
    if replicas is None:
        return obj
    out = copy.deepcopy(obj)
    out.setdefault("spec", {})["replicas"] = replicas
    # Keep the annotation in our apply, too: the degradation controller owns it, and SSA
    # must not see us "removing" a field we never set. (We do not set it, so nothing to do.)
    return out
