"""The installer's view of a bundle: components ready to apply, and object identities.

A :class:`Spec` is built once per run from a verified, staged bundle (see
:func:`agent.install.source.load_spec`), so everything below works on plain data and the rest
of the engine never touches bundle files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MANAGED_BY = "edgefleet"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "edgefleet.io/component"
LABEL_LAYER = "edgefleet.io/layer"
LABEL_TIER = "edgefleet.io/tier"
LABEL_BUNDLE = "edgefleet.io/bundle"
LABEL_RETAINED = "edgefleet.io/retained-from"
ANNOTATION_ORIGINAL_REPLICAS = "edgefleet.io/original-replicas"
FIELD_MANAGER = "edgefleet"
SYSTEM_NAMESPACE = "edgefleet-system"

#: Kinds that carry pod templates (``spec.template``, or ``spec.jobTemplate.spec.template``).
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")
#: Kinds whose deletion destroys data beyond the object itself (see docs: prune rule).
DATA_BEARING = ("Namespace", "CustomResourceDefinition", "PersistentVolumeClaim", "PersistentVolume")


@dataclass(frozen=True, order=True)
class Ref:
    """An object's identity across versions: group, kind, namespace ('' if cluster-scoped), name."""

    group: str
    kind: str
    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.group}/{self.kind}/{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, key: str) -> Ref:
        group, kind, namespace, name = key.split("/", 3)
        return cls(group=group, kind=kind, namespace=namespace, name=name)

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Ref:
        api_version = str(obj.get("apiVersion", ""))
        group = api_version.rpartition("/")[0]
        meta = obj.get("metadata") or {}
        return cls(group=group, kind=str(obj.get("kind", "")), namespace=str(meta.get("namespace") or ""),
                   name=str(meta.get("name", "")))

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}"


@dataclass
class Unit:
    """One component of a bundle with its rendered objects (labels, namespace, tier policy applied)."""

    name: str
    layer: int
    tier: int
    namespace: str
    depends_on: tuple[str, ...]
    gate_timeout: float
    #: Declared checks (see :mod:`agent.install.gates`).
    checks: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    objects: list[dict[str, Any]] = field(default_factory=list)

    def refs(self) -> dict[str, str]:
        return {Ref.of(obj).key: self.name for obj in self.objects}


@dataclass
class Spec:
    bundle_id: str
    name: str
    version: str
    release: int
    created: str
    path: str
    units: list[Unit]
    #: Directory of image archives inside the staged bundle, if it carries any.
    images_dir: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}-{self.version}"

    def unit(self, name: str) -> Unit:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise KeyError(name)

    def refs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for unit in self.units:
            out.update(unit.refs())
        return out

    def objects(self) -> dict[str, dict[str, Any]]:
        return {Ref.of(obj).key: obj for unit in self.units for obj in unit.objects}

    def layers(self) -> list[list[Unit]]:
        """Units grouped by layer, 0 → 4, each layer in a stable (name) order."""
        return [sorted((u for u in self.units if u.layer == n), key=lambda u: u.name) for n in range(5)]
