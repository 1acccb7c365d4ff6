"""What the degradation planner sees of a cluster: plain frozen dataclasses, built from API dicts.

Only what placement feasibility needs is modelled: per-pod requests (CPU, memory, one pod slot),
node allocatable and taints, tolerations, ``nodeSelector``, required node affinity, and the one
pod-affinity rule that changes packing (a *required* anti-affinity of a workload's pods against
each other over hostnames: at most one such pod per node). Preferred rules only steer the
scheduler and never make a pod unschedulable, so they are ignored here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from agent import placement

TIER_LABEL = "edgefleet.io/tier"
COMPONENT_LABEL = "edgefleet.io/component"
ORIGINAL_REPLICAS_ANNOTATION = "edgefleet.io/original-replicas"
#: The controller's own NoSchedule taint on nodes it considers lost (the scheduler still thinks
#: them Ready for 40 s and would keep placing replacements there).
LOST_TAINT = "edgefleet.io/node-lost"
CONTROL_PLANE_LABELS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
#: The workload kinds the controller scales (through their ``scale`` subresource).
SCALABLE_KINDS = ("Deployment", "StatefulSet")
API_VERSIONS = {"Deployment": "apps/v1", "StatefulSet": "apps/v1"}

_SUFFIX: dict[str, int | Decimal] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


def quantity(value: Any) -> Decimal:
    """A Kubernetes resource quantity (``"100m"``, ``"512Mi"``, ``"1.5"``, ``2``) as a Decimal.

    Unparseable values count as 0 rather than failing the whole plan: one odd manifest must not
    stop the site from degrading; the API server would have rejected a truly invalid one anyway.
    """
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(str(value).strip())
    if not match:
        return Decimal(0)
    try:
        return Decimal(match.group(1)) * Decimal(_SUFFIX[match.group(2) or ""])
    except InvalidOperation:
        return Decimal(0)


@dataclass(frozen=True, order=True)
class Resources:
    """CPU in millicores, memory in bytes, pod slots."""

    cpu_m: int = 0
    memory: int = 0
    pods: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu_m + other.cpu_m, self.memory + other.memory, self.pods + other.pods)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpu_m - other.cpu_m, self.memory - other.memory, self.pods - other.pods)

    def fits_in(self, free: Resources) -> bool:
        return self.cpu_m <= free.cpu_m and self.memory <= free.memory and self.pods <= free.pods

    @classmethod
    def parse(cls, doc: Mapping[str, Any] | None, *, pods: int = 0) -> Resources:
        doc = doc or {}
        cpu = quantity(doc.get("cpu", 0)) * 1000
        return cls(
            cpu_m=int(cpu.to_integral_value(rounding="ROUND_CEILING")),
            memory=int(quantity(doc.get("memory", 0)).to_integral_value(rounding="ROUND_CEILING")),
            pods=int(quantity(doc["pods"])) if "pods" in doc else pods,
        )


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True)
class Node:
    name: str
    #: Effectively available (Ready, heartbeating, past the hysteresis): the planner's view.
    available: bool = True
    control_plane: bool = False
    unschedulable: bool = False
    allocatable: Resources = Resources()
    taints: tuple[Taint, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    kind: str
    namespace: str
    name: str
    tier: int
    #: Replicas the bundle wants (the recorded original while scaled down, else ``spec.replicas``).
    desired: int
    #: ``spec.replicas`` as it is now.
    replicas: int
    requests: Resources = Resources(pods=1)
    component: str = ""
    tolerations: tuple[Mapping[str, Any], ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    #: ``requiredDuringScheduling…`` nodeSelectorTerms (ORed; expressions within a term ANDed).
    node_terms: tuple[Mapping[str, Any], ...] = ()
    #: Required anti-affinity of the workload's pods against each other per hostname.
    one_per_node: bool = False
    #: The original replicas from the annotation, if the live object carries one.
    annotated_original: int | None = None
    #: Nodes its live pods are bound to (one entry per pod). Running pods stay where they are,
    #: so the planner keeps them there first; only replacements are placed freely.
    running_on: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


# --------------------------------------------------------------------------- from API objects


def node_from(obj: Mapping[str, Any], *, available: bool) -> Node:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    taints = tuple(
        Taint(key=str(t.get("key", "")), value=str(t.get("value") or ""), effect=str(t.get("effect") or ""))
        for t in spec.get("taints") or []
        if isinstance(t, Mapping) and t.get("key") != LOST_TAINT  # our own: gone once the node is back
    )
    return Node(
        name=str(meta.get("name", "")),
        available=available,
        control_plane=is_control_plane(obj),
        unschedulable=bool(spec.get("unschedulable")),
        allocatable=Resources.parse(status.get("allocatable"), pods=110),
        taints=taints,
        labels=labels,
    )


def is_control_plane(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if any(label in labels for label in CONTROL_PLANE_LABELS):
        return True
    taints = (obj.get("spec") or {}).get("taints") or []
    return any(isinstance(t, Mapping) and t.get("key") == placement.CONTROL_PLANE_TAINT for t in taints)


def node_ready(obj: Mapping[str, Any]) -> bool:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def pod_requests(pod_spec: Mapping[str, Any]) -> Resources:
    """Effective pod request as the scheduler computes it: max(sum(containers), max(initContainers))."""
    total = Resources(pods=1)
    for c in pod_spec.get("containers") or []:
        total = total + Resources.parse(((c or {}).get("resources") or {}).get("requests"))
    for c in pod_spec.get("initContainers") or []:
        init = Resources.parse(((c or {}).get("resources") or {}).get("requests"))
        total = Resources(max(total.cpu_m, init.cpu_m), max(total.memory, init.memory), 1)
    overhead = pod_spec.get("overhead")
    return total + Resources.parse(overhead) if isinstance(overhead, Mapping) else total


def tier_of(obj: Mapping[str, Any]) -> int | None:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    raw = labels.get(TIER_LABEL)
    try:
        tier = int(str(raw))
    except ValueError:
        return None
    return tier if 1 <= tier <= 4 else None


def workload_from(obj: Mapping[str, Any], *, original: int | None = None) -> Workload | None:
    """A tiered Deployment/StatefulSet as the planner sees it; None for anything else.

    ``original`` is the agent DB's record of the replicas before scale-down; it wins over the
    annotation (both are written in the same step, the DB first).
    """
    kind = str(obj.get("kind", ""))
    tier = tier_of(obj)
    if kind not in SCALABLE_KINDS or tier is None:
        return None
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    pod = placement.pod_spec(obj) or {}
    replicas = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
    annotated = _int_or_none((meta.get("annotations") or {}).get(ORIGINAL_REPLICAS_ANNOTATION))
    desired = original if original is not None else annotated if annotated is not None else replicas
    affinity = pod.get("affinity") or {}
    node_aff = (affinity.get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    selector = ((spec.get("selector") or {}).get("matchLabels")) or {}
    anti = (affinity.get("podAntiAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or []
    one_per_node = any(
        isinstance(t, Mapping)
        and t.get("topologyKey") == placement.HOSTNAME_TOPOLOGY
        and _selects(t.get("labelSelector"), selector)
        for t in anti
    )
    return Workload(
        kind=kind,
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name", "")),
        tier=tier,
        desired=max(desired, 0),
        replicas=max(replicas, 0),
        requests=pod_requests(pod),
        component=str((meta.get("labels") or {}).get(COMPONENT_LABEL, "")),
        tolerations=tuple(t for t in pod.get("tolerations") or [] if isinstance(t, Mapping)),
        node_selector={str(k): str(v) for k, v in (pod.get("nodeSelector") or {}).items()},
        node_terms=tuple(t for t in node_aff.get("nodeSelectorTerms") or [] if isinstance(t, Mapping)),
        one_per_node=one_per_node,
        annotated_original=annotated,
    )


def _selects(label_selector: Any, pod_labels: Mapping[str, Any]) -> bool:
    """Whether a matchLabels-only selector selects pods carrying ``pod_labels`` (conservative)."""
    if not isinstance(label_selector, Mapping) or label_selector.get("matchExpressions"):
        return False
    wanted = label_selector.get("matchLabels") or {}
    return bool(wanted) and all(str(pod_labels.get(k)) == str(v) for k, v in wanted.items())


def _int_or_none(value: Any) -> int | None:
    try:
        return int(str(value)) if value is not None else None
    except ValueError:
        return None
