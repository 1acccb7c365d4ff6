"""The resource registry: which group/version/resources the sim serves, and discovery documents.

Built-in resources are the ones a Kubernetes 1.33 API server serves by default. APIs removed upstream
(``extensions/v1beta1``, ``rbac.authorization.k8s.io/v1beta1``, ``policy/v1beta1`` ...) are simply absent, so
clients fail on them exactly as against a real 1.33 server ("no matches for kind"). Custom resources join the
registry only once their CRD is Established, and leave it when the CRD is deleted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
CLUSTER_VERBS = ALL_VERBS
CREATE_ONLY = ("create",)


@dataclasses.dataclass(frozen=True, slots=True)
class Resource:
    """One served resource. ``storage_key`` is shared by all versions of the same group/resource."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    subresources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    singular: str = ""
    custom: bool = False
    list_kind: str = ""
    #: A CRD version's ``selectableFields`` (field labels without the leading dot): the field selectors its
    #: custom resources accept besides metadata.name/namespace (GA in 1.32).
    selectable_fields: tuple[str, ...] = ()

    @property
    def storage_key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular_name(self) -> str:
        return self.singular or self.kind.lower()

    @property
    def list_kind_name(self) -> str:
        return self.list_kind or f"{self.kind}List"


def _r(
    gv: str,
    plural: str,
    kind: str,
    *,
    ns: bool = True,
    short: Iterable[str] = (),
    sub: Iterable[str] = (),
    cat: Iterable[str] = (),
    verbs: tuple[str, ...] = ALL_VERBS,
) -> Resource:
    group, _, version = gv.rpartition("/")
    return Resource(
        group=group,
        version=version,
        plural=plural,
        kind=kind,
        namespaced=ns,
        short_names=tuple(short),
        verbs=verbs,
        subresources=tuple(sub),
        categories=tuple(cat),
    )


_ALL = ("all",)

BUILTIN: tuple[Resource, ...] = (
    _r("v1", "bindings", "Binding", verbs=CREATE_ONLY),
    _r("v1", "componentstatuses", "ComponentStatus", ns=False, short=("cs",), verbs=("get", "list")),
    _r("v1", "configmaps", "ConfigMap", short=("cm",)),
    _r("v1", "endpoints", "Endpoints", short=("ep",)),
    _r("v1", "events", "Event", short=("ev",)),
    _r("v1", "limitranges", "LimitRange", short=("limits",)),
    _r("v1", "namespaces", "Namespace", ns=False, short=("ns",), sub=("finalize", "status"),
       verbs=("create", "delete", "get", "list", "patch", "update", "watch")),
    _r("v1", "nodes", "Node", ns=False, short=("no",), sub=("status",)),
    _r("v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",), sub=("status",)),
    _r("v1", "persistentvolumes", "PersistentVolume", ns=False, short=("pv",), sub=("status",)),
    _r("v1", "pods", "Pod", short=("po",), sub=("binding", "eviction", "status", "log"), cat=_ALL),
    _r("v1", "podtemplates", "PodTemplate"),
    _r("v1", "replicationcontrollers", "ReplicationController", short=("rc",), sub=("scale", "status"), cat=_ALL),
    _r("v1", "resourcequotas", "ResourceQuota", short=("quota",), sub=("status",)),
    _r("v1", "secrets", "Secret"),
    _r("v1", "serviceaccounts", "ServiceAccount", short=("sa",), sub=("token",)),
    _r("v1", "services", "Service", short=("svc",), sub=("status",), cat=_ALL),
    _r("admissionregistration.k8s.io/v1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration", ns=False),
    _r("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", "ValidatingWebhookConfiguration",
       ns=False),
    _r("admissionregistration.k8s.io/v1", "validatingadmissionpolicies", "ValidatingAdmissionPolicy", ns=False,
       sub=("status",)),
    _r("admissionregistration.k8s.io/v1", "validatingadmissionpolicybindings", "ValidatingAdmissionPolicyBinding",
       ns=False),
    _r("apiextensions.k8s.io/v1", "customresourcedefinitions", "CustomResourceDefinition", ns=False,
       short=("crd", "crds"), sub=("status",)),
    _r("apiregistration.k8s.io/v1", "apiservices", "APIService", ns=False, sub=("status",)),
    _r("apps/v1", "controllerrevisions", "ControllerRevision"),
    _r("apps/v1", "daemonsets", "DaemonSet", short=("ds",), sub=("status",), cat=_ALL),
    _r("apps/v1", "deployments", "Deployment", short=("deploy",), sub=("scale", "status"), cat=_ALL),
    _r("apps/v1", "replicasets", "ReplicaSet", short=("rs",), sub=("scale", "status"), cat=_ALL),
    _r("apps/v1", "statefulsets", "StatefulSet", short=("sts",), sub=("scale", "status"), cat=_ALL),
    _r("authentication.k8s.io/v1", "selfsubjectreviews", "SelfSubjectReview", ns=False, verbs=CREATE_ONLY),
    _r("authentication.k8s.io/v1", "tokenreviews", "TokenReview", ns=False, verbs=CREATE_ONLY),
    _r("authorization.k8s.io/v1", "localsubjectaccessreviews", "LocalSubjectAccessReview", verbs=CREATE_ONLY),
    _r("authorization.k8s.io/v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview", ns=False,
       verbs=CREATE_ONLY),
    _r("authorization.k8s.io/v1", "selfsubjectrulesreviews", "SelfSubjectRulesReview", ns=False, verbs=CREATE_ONLY),
    _r("authorization.k8s.io/v1", "subjectaccessreviews", "SubjectAccessReview", ns=False, verbs=CREATE_ONLY),
    _r("autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short=("hpa",), sub=("status",),
       cat=_ALL),
    _r("autoscaling/v1", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short=("hpa",), sub=("status",),
       cat=_ALL),
    _r("batch/v1", "cronjobs", "CronJob", short=("cj",), sub=("status",), cat=_ALL),
    _r("batch/v1", "jobs", "Job", sub=("status",), cat=_ALL),
    _r("certificates.k8s.io/v1", "certificatesigningrequests", "CertificateSigningRequest", ns=False,
       short=("csr",), sub=("approval", "status")),
    _r("coordination.k8s.io/v1", "leases", "Lease"),
    _r("discovery.k8s.io/v1", "endpointslices", "EndpointSlice"),
    _r("events.k8s.io/v1", "events", "Event", short=("ev",)),
    _r("flowcontrol.apiserver.k8s.io/v1", "flowschemas", "FlowSchema", ns=False, sub=("status",)),
    _r("flowcontrol.apiserver.k8s.io/v1", "prioritylevelconfigurations", "PriorityLevelConfiguration", ns=False,
       sub=("status",)),
    _r("networking.k8s.io/v1", "ingressclasses", "IngressClass", ns=False),
    _r("networking.k8s.io/v1", "ingresses", "Ingress", short=("ing",), sub=("status",)),
    _r("networking.k8s.io/v1", "ipaddresses", "IPAddress", ns=False, short=("ip",)),
    _r("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", short=("netpol",)),
    _r("networking.k8s.io/v1", "servicecidrs", "ServiceCIDR", ns=False, sub=("status",)),
    _r("node.k8s.io/v1", "runtimeclasses", "RuntimeClass", ns=False),
    _r("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", short=("pdb",), sub=("status",)),
    _r("rbac.authorization.k8s.io/v1", "clusterrolebindings", "ClusterRoleBinding", ns=False),
    _r("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", ns=False),
    _r("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding"),
    _r("rbac.authorization.k8s.io/v1", "roles", "Role"),
    _r("scheduling.k8s.io/v1", "priorityclasses", "PriorityClass", ns=False, short=("pc",)),
    _r("storage.k8s.io/v1", "csidrivers", "CSIDriver", ns=False),
    _r("storage.k8s.io/v1", "csinodes", "CSINode", ns=False),
    _r("storage.k8s.io/v1", "csistoragecapacities", "CSIStorageCapacity"),
    _r("storage.k8s.io/v1", "storageclasses", "StorageClass", ns=False, short=("sc",)),
    _r("storage.k8s.io/v1", "volumeattachments", "VolumeAttachment", ns=False, sub=("status",)),
)

# Preferred version per group, in the order a real server lists groups (core groups first).
BUILTIN_GROUP_ORDER = (
    "", "apiregistration.k8s.io", "apps", "events.k8s.io", "authentication.k8s.io", "authorization.k8s.io",
    "autoscaling", "batch", "certificates.k8s.io", "networking.k8s.io", "policy", "rbac.authorization.k8s.io",
    "storage.k8s.io", "admissionregistration.k8s.io", "apiextensions.k8s.io", "scheduling.k8s.io",
    "coordination.k8s.io", "node.k8s.io", "discovery.k8s.io", "flowcontrol.apiserver.k8s.io",
)


class Registry:
    """Mutable index of served resources: built-ins plus the resources of Established CRDs."""

    def __init__(self) -> None:
        self._by_gvr: dict[tuple[str, str, str], Resource] = {}
        self._group_versions: dict[str, list[str]] = {}
        self._crd_resources: dict[str, list[Resource]] = {}
        for res in BUILTIN:
            self._add(res)
        self.generation = 0

    def _add(self, res: Resource) -> None:
        self._by_gvr[(res.group, res.version, res.plural)] = res
        versions = self._group_versions.setdefault(res.group, [])
        if res.version not in versions:
            versions.append(res.version)

    def lookup(self, group: str, version: str, plural: str) -> Resource | None:
        return self._by_gvr.get((group, version, plural))

    def group_versions(self, group: str) -> list[str]:
        return list(self._group_versions.get(group, []))

    def groups(self) -> list[str]:
        """Groups in discovery order: built-ins first, then custom groups sorted by name."""
        builtin = [g for g in BUILTIN_GROUP_ORDER if g in self._group_versions and g]
        custom = sorted(g for g in self._group_versions if g and g not in BUILTIN_GROUP_ORDER)
        return builtin + custom

    def resources_in(self, group: str, version: str) -> list[Resource]:
        return [r for (g, v, _), r in self._by_gvr.items() if g == group and v == version]

    def all_resources(self) -> list[Resource]:
        return list(self._by_gvr.values())

    def by_kind(self, group: str, kind: str) -> Resource | None:
        for (g, _, _), r in self._by_gvr.items():
            if g == group and r.kind == kind:
                return r
        return None

    def set_crd(self, crd_name: str, resources: list[Resource]) -> None:
        """Serve (or re-serve, on CRD update) the resources of an Established CRD."""
        self.remove_crd(crd_name)
        self._crd_resources[crd_name] = resources
        for res in resources:
            self._add(res)
        self.generation += 1

    def remove_crd(self, crd_name: str) -> None:
        old = self._crd_resources.pop(crd_name, None)
        if not old:
            return
        for res in old:
            self._by_gvr.pop((res.group, res.version, res.plural), None)
            still = any(g == res.group and v == res.version for (g, v, _) in self._by_gvr)
            if not still and res.version in self._group_versions.get(res.group, []):
                self._group_versions[res.group].remove(res.version)
                if not self._group_versions[res.group]:
                    del self._group_versions[res.group]
        self.generation += 1


def crd_resources(crd: dict[str, Any]) -> list[Resource]:
    """The resources a CRD serves: one per served version, with its scope, names and subresources."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    out = []
    for ver in spec.get("versions") or []:
        if not ver.get("served", True):
            continue
        subs = ver.get("subresources") or {}
        out.append(
            Resource(
                group=spec.get("group", ""),
                version=ver.get("name", ""),
                plural=names.get("plural", ""),
                kind=names.get("kind", ""),
                namespaced=spec.get("scope") == "Namespaced",
                short_names=tuple(names.get("shortNames") or ()),
                subresources=tuple(s for s in ("scale", "status") if s in subs),
                categories=tuple(names.get("categories") or ()),
                singular=names.get("singular") or "",
                custom=True,
                list_kind=names.get("listKind") or "",
                selectable_fields=tuple(str(f["jsonPath"]).lstrip(".") for f in ver.get("selectableFields") or []
                                        if isinstance(f, dict) and f.get("jsonPath")),
            )
        )
    return out


def preferred_version(registry: Registry, group: str) -> str:
    versions = registry.group_versions(group)
    return versions[0] if versions else ""


def _api_resource(res: Resource, sub: str = "") -> dict[str, Any]:
    if sub:
        verbs = {"status": ["get", "patch", "update"], "scale": ["get", "patch", "update"],
                 "eviction": ["create"], "binding": ["create"], "token": ["create"], "log": ["get"],
                 "finalize": ["update"], "approval": ["get", "patch", "update"]}.get(sub, ["get"])
        kind = {"scale": "Scale", "eviction": "Eviction", "binding": "Binding", "token": "TokenRequest",
                "log": "Pod"}.get(sub, res.kind)
        doc: dict[str, Any] = {"name": f"{res.plural}/{sub}", "singularName": "", "namespaced": res.namespaced,
                               "kind": kind, "verbs": verbs}
        if sub == "scale":
            doc.update(group="autoscaling", version="v1")
        elif sub == "eviction":
            doc.update(group="policy", version="v1")
        return doc
    doc = {"name": res.plural, "singularName": res.singular_name, "namespaced": res.namespaced, "kind": res.kind,
           "verbs": list(res.verbs)}
    if res.short_names:
        doc["shortNames"] = list(res.short_names)
    if res.categories:
        doc["categories"] = list(res.categories)
    doc["storageVersionHash"] = _hash(f"{res.group}/{res.plural}")
    return doc


def _hash(text: str) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(text.encode()).digest()[:8]).decode()


def resource_list(registry: Registry, group: str, version: str) -> dict[str, Any]:
    """``APIResourceList`` for /api/v1 or /apis/{group}/{version}."""
    resources: list[dict[str, Any]] = []
    for res in sorted(registry.resources_in(group, version), key=lambda r: r.plural):
        resources.append(_api_resource(res))
        for sub in res.subresources:
            resources.append(_api_resource(res, sub))
    gv = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}


def api_versions() -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}


def api_group(registry: Registry, group: str) -> dict[str, Any]:
    versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in registry.group_versions(group)]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions,
            "preferredVersion": versions[0] if versions else {}}


def api_group_list(registry: Registry) -> dict[str, Any]:
    groups = [api_group(registry, g) for g in registry.groups()]
    for g in groups:
        g.pop("kind")
        g.pop("apiVersion")
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def aggregated(registry: Registry, *, legacy: bool) -> dict[str, Any]:
    """``apidiscovery.k8s.io/v2`` APIGroupDiscoveryList: one request instead of one per group-version."""
    groups = [""] if legacy else registry.groups()
    items = []
    for group in groups:
        versions = []
        for version in registry.group_versions(group):
            resources = []
            for res in sorted(registry.resources_in(group, version), key=lambda r: r.plural):
                doc: dict[str, Any] = {
                    "resource": res.plural,
                    "responseKind": {"group": group, "version": version, "kind": res.kind},
                    "scope": "Namespaced" if res.namespaced else "Cluster",
                    "singularResource": res.singular_name,
                    "verbs": list(res.verbs),
                }
                if res.short_names:
                    doc["shortNames"] = list(res.short_names)
                if res.categories:
                    doc["categories"] = list(res.categories)
                subs = []
                for sub in res.subresources:
                    legacy_doc = _api_resource(res, sub)
                    kind_group = legacy_doc.get("group", group)
                    kind_version = legacy_doc.get("version", version)
                    subs.append({"subresource": sub,
                                 "responseKind": {"group": kind_group, "version": kind_version,
                                                  "kind": legacy_doc["kind"]},
                                 "verbs": legacy_doc["verbs"]})
                if subs:
                    doc["subresources"] = subs
                resources.append(doc)
            versions.append({"version": version, "resources": resources, "freshness": "Current"})
        items.append({"metadata": {"name": group, "creationTimestamp": None}, "versions": versions})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {},
            "items": items}
