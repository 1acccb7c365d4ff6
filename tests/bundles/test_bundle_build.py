"""The builder: the real IDP bundle from ../shared/platform, and what it must refuse."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from bundle_kit import Kit

from bundles import build, content, errors, verify

NEEDS_HELM = {"cilium", "loki", "fluent-bit", "sonarqube", "dex", "backstage"}
LAYERS = {
    0: {"cilium", "priority-classes", "namespaces"},
    1: {"cert-manager", "vault", "gateway-api", "prometheus", "loki", "fluent-bit"},
    2: {"argo-cd", "kyverno", "external-secrets", "argo-workflows", "argo-events"},
    3: {"grafana", "sonarqube", "policy-reporter", "trivy", "pyrra"},
    4: {"backstage", "dex"},
}
TIERS = {2: {"argo-cd", "prometheus"}, 3: {"loki", "argo-events"}}


@pytest.fixture(scope="module")
def idp_kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return Kit(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def idp(platform: Path, idp_kit: Kit) -> build.BuildResult:
    return build.build(
        profile=build.DEFAULT_PROFILE, platform=platform / "idp-blueprint", mirror=platform / "mirror",
        out=idp_kit.tmp / "idp.efb", version="1.0.0", release=1, keys=idp_kit.release_keys[:2],
        allow_unrendered=True,
    )


def test_idp_bundle_layers_tiers_and_helm(idp: build.BuildResult) -> None:
    m = idp.manifest
    assert set(idp.needs_helm) == NEEDS_HELM
    for layer, names in LAYERS.items():
        assert {c.name for c in m.components if c.layer == layer} == names
    for tier, names in TIERS.items():
        assert {c.name for c in m.components if c.tier == tier} == names
    assert {c.name for c in m.components if c.tier == 1} >= {"cilium", "priority-classes", "namespaces",
                                                             "cert-manager", "vault", "gateway-api"}
    for c in m.components:
        assert c.rendered == (c.name not in NEEDS_HELM)
        if not c.rendered:
            assert c.needs == ("helm",) and c.source.helm is not None and not c.files
    # Tier 2 outranks tiers 3 and 4; every tier's PriorityClass ships in the bundle.
    assert m.tiers[2].priority_class_name == "edgefleet-tier-2"
    assert m.tiers[1].tolerate_control_plane and m.tiers[2].tolerate_control_plane
    assert not m.tiers[4].tolerate_control_plane
    # Install order: layers ascend and dependencies come first.
    order = [c.name for c in m.install_order()]
    assert order.index("namespaces") < order.index("cert-manager") < order.index("gateway-api")
    assert [c.layer for c in m.install_order()] == sorted(c.layer for c in m.components)


def test_idp_bundle_picks_installable_files(idp: build.BuildResult) -> None:
    m = idp.manifest
    names = [f.path for f in m.files]
    assert not any("sonarqube" in p or "fluent-bit" in p or "namespace-install" in p for p in names)
    assert any(p.endswith("-install.yaml") for p in m.component("argo-cd").files)
    assert not any("prometheusAdapter" in p for p in names)
    assert len(m.component("policy-reporter").files) == 2
    assert m.component("argo-cd").namespace == "argocd"
    assert m.component("argo-workflows").namespace == "argo"
    assert m.component("vault").namespace == "vault"
    checks = {(h.type, h.name) for h in m.component("argo-cd").health_checks}
    assert ("deployment-available", "argocd-server") in checks
    assert ("statefulset-ready", "argocd-application-controller") in checks
    assert ("crd-established", "applications.argoproj.io") in checks
    assert ("daemonset-ready", "node-exporter") in {(h.type, h.name) for h in m.component("prometheus").health_checks}
    assert any(i.startswith("quay.io/argoproj/argocd:") for i in m.component("argo-cd").images)


def test_idp_bundle_stages_and_every_object_parses(idp: build.BuildResult, idp_kit: Kit,
                                                   tmp_path: Path) -> None:
    result = idp
    with pytest.raises(errors.UnknownKey):  # another site's root
        verify.verify_only(result.path, root=Kit(tmp_path).root)
    staged = verify.verify_and_stage(result.path, root=idp_kit.root, store_dir=idp_kit.store,
                                     kubernetes_version="1.33.4", arch="amd64", min_release=1)
    assert staged.manifest == result.manifest
    assert stat.S_IMODE(staged.path.stat().st_mode) == 0o700
    seen_ns = {"default", "kube-system", "kube-public", "kube-node-lease"}
    count = 0
    for c in staged.manifest.installable():
        for obj in content.load_objects(staged.path, c):
            count += 1
            if obj["kind"] == "Namespace":
                seen_ns.add(obj["metadata"]["name"])
            ns = obj["metadata"].get("namespace")
            if ns:
                assert ns in seen_ns, f"{c.name}: {obj['kind']} {obj['metadata']['name']} before namespace {ns}"
    assert count == result.object_count
    assert [c.name for c in staged.manifest.installable()] == [
        c.name for c in staged.manifest.install_order() if c.rendered
    ]


def test_build_without_allow_unrendered_names_the_component(platform: Path, tmp_path: Path) -> None:
    with pytest.raises(errors.BuildError, match=r"component cilium: needs helm .*cilium 1\.18\.2"):
        build.build(profile=build.DEFAULT_PROFILE, platform=platform / "idp-blueprint", mirror=platform / "mirror",
                    out=tmp_path / "x.efb", version="1.0.0", release=1, tools=build.Tools(helm=None))
    assert not (tmp_path / "x.efb").exists()


def test_build_without_mirror_names_the_component(platform: Path, tmp_path: Path) -> None:
    with pytest.raises(errors.BuildError, match=r"component cert-manager: source mirror:.* needs the offline mirror"):
        build.build(profile=build.DEFAULT_PROFILE, platform=platform / "idp-blueprint", mirror=None,
                    out=tmp_path / "x.efb", version="1.0.0", release=1, allow_unrendered=True)


def test_gateway_excludes_cilium_objects(idp: build.BuildResult, idp_kit: Kit) -> None:
    m = idp.manifest
    staged = verify.verify_and_stage(idp.path, root=idp_kit.root, store_dir=idp_kit.tmp / "gw-store")
    kinds = {o["kind"] for o in content.load_objects(staged.path, m.component("gateway-api"))}
    assert {"CustomResourceDefinition", "Gateway", "HTTPRoute", "Certificate"} <= kinds
    assert not {k for k in kinds if k.startswith("Cilium")}


# --- small profiles: what the builder must refuse ------------------------------------------------------


def profile(tmp_path: Path, components: list[dict[str, Any]]) -> Path:
    doc = {
        "name": "t", "tiers": {1: {"priorityClassName": None}, 4: {}},
        "components": components,
    }
    p = tmp_path / "profile.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def run(tmp_path: Path, platform: Path, components: list[dict[str, Any]], **kw: Any) -> build.BuildResult:
    return build.build(profile=profile(tmp_path, components), platform=platform / "idp-blueprint",
                       mirror=platform / "mirror", out=tmp_path / "t.efb", version="0.1.0", release=1, **kw)


NS = {"name": "ns", "layer": 0, "tier": 1, "sources": [{"kustomize": "IT/namespaces"}]}


@pytest.mark.parametrize(("component", "message"), [
    ({"name": "fb", "layer": 1, "tier": 4, "sources": [{"mirror": "fluent-bit/1.5/fluent-bit-role.yaml"}]},
     "rbac.authorization.k8s.io/v1beta1 is not served"),
    ({"name": "fb", "layer": 1, "tier": 4,
      "sources": [{"mirror": "fluent-bit/1.5/fluent-bit-openshift-security-context-constraints.yaml"}]},
     "no CRD for SecurityContextConstraints"),
    ({"name": "sq", "layer": 3, "tier": 4, "namespace": "default",
      "sources": [{"mirror": "sonarqube/2025.5.0/tests/unit-compatibility-test/fixtures/sonarqube/"
                             "default-values.yaml"}]},
     "DNS-1035"),
    ({"name": "pr", "layer": 3, "tier": 4,
      "sources": [{"mirror": "policy-reporter/3.5.0/manifests/policy-reporter/install.yaml"}]},
     "namespace policy-reporter is not created before it"),
    ({"name": "cd", "layer": 2, "tier": 4, "namespace": "argocd",
      "sources": [{"mirror": "argo-cd/v3.1.8/manifests/install.yaml"},
                  {"mirror": "argo-cd/v3.1.8/manifests/namespace-install.yaml"}]},
     "also shipped by component cd"),
    ({"name": "x", "layer": 1, "tier": 4, "sources": [{"mirror": "does/not/exist.yaml"}]},
     "component x: mirror:does/not/exist.yaml does not exist"),
    ({"name": "gw", "layer": 1, "tier": 4, "sources": [{"kustomize": "IT/gateway"}]},
     r"no CRD for \w+\.[\w.-]+ is applied before it"),
    ({"name": "l", "layer": 1, "tier": 4, "namespace": "observability",
      "helm": {"repo": "https://grafana.github.io/helm-charts", "chart": "loki", "version": "9.9.9",
               "pinnedIn": "K8s/observability/loki/kustomization.yaml"}},
     "profile pins loki 9.9.9 but"),
])
def test_build_refuses(tmp_path: Path, platform: Path, component: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.BuildError, match=message):
        run(tmp_path, platform, [NS, component], allow_unrendered=True)
    assert not (tmp_path / "t.efb").exists()


def test_helm_renders_when_present(tmp_path: Path, platform: Path) -> None:
    """A helm-only component is rendered with `helm template` when helm is on PATH (fake helm here)."""
    fake = tmp_path / "bin" / "helm"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        "echo \"$@\" > \"$(dirname \"$0\")/args\"\n"
        "cat <<'EOF'\n"
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: loki-gateway}\n"
        "spec: {selector: {matchLabels: {a: b}}, template: {metadata: {labels: {a: b}},"
        " spec: {containers: [{name: c, image: 'grafana/loki:3.5.5'}]}}}\n"
        "EOF\n"
    )
    fake.chmod(0o755)
    loki = {"name": "loki", "layer": 1, "tier": 3, "namespace": "observability", "dependsOn": ["ns"],
            "helm": {"repo": "https://grafana.github.io/helm-charts", "chart": "loki", "version": "6.42.0",
                     "values": "K8s/observability/loki/values.yaml",
                     "pinnedIn": "K8s/observability/loki/kustomization.yaml"}}
    doc_tiers = {1: {}, 3: {}}
    p = tmp_path / "profile.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "tiers": doc_tiers, "components": [NS, loki]}))
    result = build.build(profile=p, platform=platform / "idp-blueprint", mirror=None, out=tmp_path / "t.efb",
                         version="0.1.0", release=1, tools=build.Tools(helm=str(fake)))
    c = result.manifest.component("loki")
    assert c.rendered and c.source.type == "helm" and c.images == ("grafana/loki:3.5.5",)
    assert c.health_checks[0].name == "loki-gateway" and c.health_checks[0].namespace == "observability"
    args = (fake.parent / "args").read_text()
    assert "template loki loki --repo https://grafana.github.io/helm-charts --version 6.42.0" in args
    assert "--namespace observability" in args and "values.yaml" in args


def test_kustomize_needs_kubectl(tmp_path: Path, platform: Path) -> None:
    with pytest.raises(errors.BuildError, match="component ns: kustomize dir IT/namespaces needs kubectl"):
        run(tmp_path, platform, [NS], tools=build.Tools(kubectl=None, kustomize=None, helm=None))


def test_build_expiry_and_release_are_recorded(tmp_path: Path, platform: Path) -> None:
    result = run(tmp_path, platform, [NS], created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert result.manifest.release == 1
    assert result.manifest.expires == dt.datetime(2026, 6, 30, tzinfo=dt.UTC)
    assert os.path.getsize(result.path) > 0


def test_helm_replaces_mirror_sources_unless_prefer_mirror(tmp_path: Path, platform: Path) -> None:
    fake = tmp_path / "bin" / "helm"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ncat <<'EOF'\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: from-helm}\nEOF\n")
    fake.chmod(0o755)
    trivy = {"name": "trivy", "layer": 3, "tier": 4, "namespace": "argocd", "dependsOn": ["ns"],
             "helm": {"repo": "https://aquasecurity.github.io/helm-charts/", "chart": "trivy-operator",
                      "version": "0.31.0", "pinnedIn": "K8s/security/trivy/kustomization.yaml"},
             "sources": [{"inline": "cm.yaml", "objects": [
                 {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "idp-local"}}]},
                 {"mirror": "trivy-operator/v0.29.0/deploy/static/trivy-operator.yaml"}]}
    p = tmp_path / "profile.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "tiers": {1: {}, 4: {}}, "components": [NS, trivy]}))
    common: dict[str, Any] = {"profile": p, "platform": platform / "idp-blueprint", "mirror": platform / "mirror",
                              "version": "0.1.0", "release": 1, "tools": build.Tools(helm=str(fake))}
    with_helm = build.build(out=tmp_path / "a.efb", **common).manifest.component("trivy")
    assert with_helm.source.type == "helm"
    assert with_helm.source.paths == ("helm:trivy-operator", "inline:cm.yaml")
    mirrored = build.build(out=tmp_path / "b.efb", prefer_mirror=True, **common).manifest.component("trivy")
    assert mirrored.source.type == "mirror" and len(mirrored.health_checks) > 1
