"""Rendering a staged bundle one object at a time (agent/install/source.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from install_kit import Comp, Keys, build_bundle, context

from agent import intake
from agent.install import journal, source


def _crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.example.com"},
        "spec": {"group": "example.com", "scope": scope, "names": {"kind": kind, "plural": plural},
                 "versions": [{"name": "v1", "served": True, "storage": True}]},
    }


def _cr(kind: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "example.com/v1", "kind": kind, "metadata": {"name": name}}


async def test_custom_resources_before_their_crd_get_its_scope_and_keep_their_place(
    tmp_path: Path, trust_keys: Keys, agent_config: Path
) -> None:
    """A custom resource may precede its CRD in a file: it must wait for it, not guess its scope
    (a cluster-scoped one given a namespace is rejected by the API server), and the component's
    object order must stay the file's."""
    objects = [
        _cr("Gadget", "g1"),  # cluster-scoped, its CRD further down
        _cr("Widget", "w1"),  # namespaced, its CRD further down
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}},
        _crd("Gadget", "gadgets", "Cluster"),
        _crd("Widget", "widgets", "Namespaced"),
        _cr("Gadget", "g2"),  # after its CRD
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "cr"}},
    ]
    comps = [Comp(name="app", layer=1, tier=4, namespace="apps", objects=objects)]
    ctx = context(agent_config)
    result = await intake.import_bundle(ctx, build_bundle(tmp_path / "b", k=trust_keys, comps=comps,
                                                          version="1.0.0", release=1))
    rec = journal.get_bundle(ctx.store, result.bundle_id)
    assert rec is not None
    spec = source.load_spec(manifest_json=rec.manifest, bundle_id=rec.bundle_id, path=rec.path, default_timeout=60)
    assert spec.unit("app").keys == [
        "example.com/Gadget//g1",
        "example.com/Widget/apps/w1",
        "/ConfigMap/apps/cm",
        "apiextensions.k8s.io/CustomResourceDefinition//gadgets.example.com",
        "apiextensions.k8s.io/CustomResourceDefinition//widgets.example.com",
        "example.com/Gadget//g2",
        "rbac.authorization.k8s.io/ClusterRole//cr",
    ]
    rendered = spec.objects()
    assert "namespace" not in rendered["example.com/Gadget//g1"]["metadata"]
    assert rendered["example.com/Widget/apps/w1"]["metadata"]["namespace"] == "apps"
