"""Fidelity: ``kubectl apply --server-side`` of EVERY manifest in the platform mirror, as on a real 1.33 server.

Namespaces and CRDs first, then everything else. The files a real 1.33 API server rejects must fail with the
same errors, and nothing else may fail:
- sonarqube helm-unittest fixtures: Services named ``*.yaml-*`` are invalid DNS-1035 labels (422 Invalid);
- fluent-bit 1.5: ``rbac.authorization.k8s.io/v1beta1`` (removed in 1.22) and OpenShift's
  SecurityContextConstraints (no CRD): "no matches for kind";
- policy-reporter's kyverno-ui-ha variant: ``policy/v1beta1`` PodDisruptionBudgets (removed in 1.25), which the
  platform README does not list but which a real 1.33 server refuses all the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sim_helpers import Kubectl

import sim.testing

PRE_EXISTING = ("argocd", "argo", "argo-events", "policy-reporter", "vault", "logging", "monitoring")
NS_FLAG = {"argo-cd": "argocd", "argo-workflows": "argo", "vault-k8s": "vault"}


def _groups(mirror: Path) -> list[tuple[int, str, list[Path]]]:
    files = sorted(p for p in mirror.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    groups: dict[tuple[int, str], list[Path]] = {}
    for f in files:
        text = f.read_text(errors="replace")
        first = 0 if re.search(r"^kind: (CustomResourceDefinition|Namespace)\s*$", text, re.M) else 1
        component = f.relative_to(mirror).parts[0]
        groups.setdefault((first, NS_FLAG.get(component, "")), []).append(f)
    return [(phase, ns, fs) for (phase, ns), fs in sorted(groups.items())]


@pytest.mark.slow
def test_apply_whole_mirror_server_side(platform: Path, tmp_path: Path) -> None:
    mirror = platform / "mirror"
    with sim.testing.start_thread(speed=20.0, workdir=tmp_path / "site") as site:
        k = Kubectl(site.kubeconfig, tmp_path / "cache")
        for ns in PRE_EXISTING:
            k("create", "namespace", ns)
        stderr = ""
        applied = 0
        for _phase, ns, files in _groups(mirror):
            args = ["apply", "--server-side"] + (["-n", ns] if ns else [])
            for f in files:
                args += ["-f", str(f)]
            proc = k.run(*args, check=False, timeout=600)
            applied += proc.stdout.count("serverside-applied")
            stderr += proc.stderr + "\n"
        # kubectl prints many errors either one per line or aggregated as "error: [a, b, ...]"
        invalid = re.findall(r'Error from server \(Invalid\): Service "([a-z-]+\.yaml-[a-z-]+)" is invalid: '
                             r'metadata\.name: Invalid value: "\1": a DNS-1035 label must consist of lower case '
                             r"alphanumeric characters or '-', start with an alphabetic character, and end with an "
                             r"alphanumeric character \(e\.g\. 'my-name',  or 'abc-123', regex used for validation is "
                             r"'\[a-z\]\(\[-a-z0-9\]\*\[a-z0-9\]\)\?'\)", stderr)
        assert len(invalid) == 12 and all(name.split(".yaml-")[0] in (
            "community-build-values", "default-values", "http-routes-values", "prometheus-monitoring-values")
            for name in invalid)
        mapping_re = (r'resource mapping not found for name: "[^"]+" namespace: "[^"]*" from "[^"]+": '
                      r'no matches for kind "(\w+)" in version "([\w./]+)"')
        kinds = sorted(re.findall(mapping_re, stderr))
        assert kinds == [("ClusterRole", "rbac.authorization.k8s.io/v1beta1"),
                         ("ClusterRoleBinding", "rbac.authorization.k8s.io/v1beta1"),
                         ("PodDisruptionBudget", "policy/v1beta1"), ("PodDisruptionBudget", "policy/v1beta1"),
                         ("PodDisruptionBudget", "policy/v1beta1"),
                         ("SecurityContextConstraints", "security.openshift.io/v1")]
        rest = re.sub(mapping_re, "", stderr)
        rest = re.sub(r'Error from server \(Invalid\): Service "[^"]+" is invalid: metadata\.name: [^\n]*', "", rest)
        rest = re.sub(r"ensure CRDs are installed first|error:|[\[\],\s]", "", rest)
        assert rest == "", f"unexpected kubectl errors: {stderr}"
        assert applied > 600
        # custom resources are served and listed
        crds = json.loads(k("get", "crd", "-o", "json"))["items"]
        assert len(crds) >= 80
        assert all(any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
                   for crd in crds)
        assert len(k("get", "servicemonitors", "-A", "-o", "name").split()) == 15
        assert len(k("get", "servicelevelobjectives.pyrra.dev", "-A", "-o", "name").split()) == 14
        assert "prometheus.monitoring.coreos.com/k8s" in k("get", "prometheus", "-n", "monitoring", "-o", "name")
        assert k("get", "httproutes", "-n", "default", "-o", "name").strip()
        # argo-workflows ships "full" and "minimal" CRDs: the minimal file came last, and server-side apply by the
        # same manager removed the fields it no longer applies (the schema), exactly as a real server does
        small = json.loads(k("get", "crd", "workflows.argoproj.io", "-o", "json"))
        assert len(json.dumps(small)) < 10_000
        f = mirror / "argo-workflows/v3.7.3/manifests/base/crds/full/argoproj.io_workflows.yaml"
        k("apply", "--server-side", "-f", str(f))
        big = json.loads(k("get", "crd", "workflows.argoproj.io", "-o", "json"))
        assert len(json.dumps(big)) > 900_000  # the ~950 KiB CRD round-trips whole
        # client-side apply of a CRD over 256 KiB fails on the last-applied annotation, as on a real server
        proc = k.run("apply", "-f", str(mirror / "kyverno/v1.15.2/config/install-latest-testing.yaml"), check=False)
        assert 'CustomResourceDefinition.apiextensions.k8s.io "policies.kyverno.io" is invalid: ' \
               "metadata.annotations: Too long: must have at most 262144 bytes" in proc.stderr
        # re-applying is a no-op: nothing changes, no resourceVersion moves
        k("apply", "--server-side", "-f", str(f))
        again = json.loads(k("get", "crd", "workflows.argoproj.io", "-o", "json"))
        assert again["metadata"]["resourceVersion"] == big["metadata"]["resourceVersion"]
        assert "Running" in k("get", "pods", "-n", "monitoring")
