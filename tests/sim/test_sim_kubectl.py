"""Fidelity: the real kubectl against the sim (discovery, tables, watch, apply, scale, rollout, drain, explain)."""

from __future__ import annotations

import json
import time

import pytest
from sim_helpers import Kubectl

DEPLOY = """
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: nginx
        image: nginx:1.27
        ports: [{containerPort: 80}]
        resources: {requests: {cpu: 100m, memory: 64Mi}}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports: [{port: 80}]
"""

DAEMONSET = """
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: agent
  namespace: shop
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: a, image: busybox:1.36}]
"""


def _wait(pred, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


@pytest.fixture(scope="module")
def shop(kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    path = tmp_path_factory.mktemp("m") / "deploy.yaml"
    path.write_text(DEPLOY)
    out = kubectl("apply", "--server-side", "-f", str(path))
    assert "deployment.apps/web serverside-applied" in out
    kubectl("wait", "-n", "shop", "--for=condition=Available", "deployment/web", "--timeout=30s")
    return kubectl


def test_get_nodes_shows_roles_status_and_version(kubectl: Kubectl) -> None:
    out = kubectl("get", "nodes")
    lines = out.strip().splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert set(rows) == {"server-0", "agent-0", "agent-1"}
    assert rows["server-0"][1] == "Ready" and "control-plane" in rows["server-0"][2]
    assert rows["agent-0"][4] == "v1.33.4+k3s1"
    node = json.loads(kubectl("get", "node", "server-0", "-o", "json"))
    assert {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == "server-0"
    assert node["status"]["allocatable"]["pods"] == "110"


def test_system_namespaces_and_node_leases(kubectl: Kubectl) -> None:
    names = kubectl("get", "ns", "-o", "name").split()
    for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
        assert f"namespace/{ns}" in names
    leases = kubectl("get", "leases", "-n", "kube-node-lease", "-o", "name").split()
    assert sorted(leases) == ["lease.coordination.k8s.io/agent-0", "lease.coordination.k8s.io/agent-1",
                              "lease.coordination.k8s.io/server-0"]


def test_get_pods_wide_and_rollout(shop: Kubectl) -> None:
    assert "successfully rolled out" in shop("rollout", "status", "-n", "shop", "deployment/web", "--timeout=30s")
    out = shop("get", "pods", "-A", "-o", "wide")
    header = out.splitlines()[0].split()
    assert header[:6] == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert "NODE" in header and "IP" in header
    rows = [ln.split() for ln in out.splitlines()[1:] if ln.startswith("shop")]
    assert len(rows) == 2
    for row in rows:
        assert row[2] == "1/1" and row[3] == "Running"
        assert row[7] in ("agent-0", "agent-1")  # the control-plane taint keeps them off server-0
        assert row[6].startswith("10.42.")


def test_scale_then_rollout_status(shop: Kubectl) -> None:
    assert "scaled" in shop("scale", "-n", "shop", "deployment/web", "--replicas=3")
    shop("rollout", "status", "-n", "shop", "deployment/web", "--timeout=30s")
    dep = json.loads(shop("get", "-n", "shop", "deployment/web", "-o", "json"))
    assert dep["status"]["readyReplicas"] == 3 and dep["status"]["availableReplicas"] == 3
    assert dep["status"]["observedGeneration"] == dep["metadata"]["generation"]
    # the scale subresource owns spec.replicas now: a server-side apply of another count conflicts
    proc = shop.run("apply", "--server-side", "-f", "-", check=False, stdin=DEPLOY)
    assert proc.returncode != 0
    assert "conflict" in proc.stderr and ".spec.replicas" in proc.stderr
    shop("scale", "-n", "shop", "deployment/web", "--replicas=2")


def test_rolling_update_replaces_pods(shop: Kubectl) -> None:
    before = set(shop("get", "pods", "-n", "shop", "-l", "app=web", "-o", "name").split())
    shop("set", "image", "-n", "shop", "deployment/web", "nginx=nginx:1.28")
    shop("rollout", "status", "-n", "shop", "deployment/web", "--timeout=30s")
    rs = json.loads(shop("get", "rs", "-n", "shop", "-o", "json"))["items"]
    assert len(rs) == 2
    by_image = {r["spec"]["template"]["spec"]["containers"][0]["image"]: r for r in rs}
    assert by_image["nginx:1.28"]["status"]["readyReplicas"] == 2
    assert by_image["nginx:1.27"]["spec"]["replicas"] == 0
    after = set(_wait(lambda: shop("get", "pods", "-n", "shop", "-l", "app=web", "-o", "name").split()
                      if len(shop("get", "pods", "-n", "shop", "-l", "app=web", "-o", "name").split()) == 2
                      else None))
    assert not before & after


def test_label_annotate_patch(shop: Kubectl) -> None:
    shop("label", "-n", "shop", "svc/web", "tier=edge")
    shop("annotate", "-n", "shop", "svc/web", "owner=team-a")
    shop("patch", "-n", "shop", "svc/web", "--type", "merge", "-p", '{"metadata":{"labels":{"merged":"yes"}}}')
    shop("patch", "-n", "shop", "svc/web", "--type", "json",
         "-p", '[{"op":"add","path":"/metadata/labels/jsonpatched","value":"yes"}]')
    shop("patch", "-n", "shop", "svc/web", "-p", '{"spec":{"ports":[{"port":80,"name":"http"}]}}')
    svc = json.loads(shop("get", "-n", "shop", "svc/web", "-o", "json", "--show-managed-fields"))
    labels = svc["metadata"]["labels"]
    assert labels["tier"] == "edge" and labels["merged"] == "yes" and labels["jsonpatched"] == "yes"
    assert svc["metadata"]["annotations"]["owner"] == "team-a"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]
    assert svc["spec"]["clusterIP"].startswith("10.43.")
    managers = {m["manager"] for m in svc["metadata"]["managedFields"]}
    assert {"kubectl-label", "kubectl-annotate", "kubectl-patch"} <= managers
    bad = shop.run("patch", "-n", "shop", "svc/web", "--type", "json",
                   "-p", '[{"op":"replace","path":"/metadata/nope/x","value":1}]', check=False)
    assert bad.returncode != 0


def test_get_watch_streams_changes(shop: Kubectl) -> None:
    proc = shop.popen("get", "pods", "-n", "shop", "-w", "--output-watch-events")
    try:
        time.sleep(1.0)
        shop("scale", "-n", "shop", "deployment/web", "--replicas=3")
        shop("rollout", "status", "-n", "shop", "deployment/web", "--timeout=30s")
        time.sleep(0.5)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    events = [ln.split()[0] for ln in out.splitlines()[1:] if ln.strip()]
    assert "ADDED" in events and "MODIFIED" in events
    shop("scale", "-n", "shop", "deployment/web", "--replicas=2")


def test_cordon_and_drain(shop: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("ds") / "ds.yaml"
    path.write_text(DAEMONSET)
    shop("apply", "--server-side", "-f", str(path))
    _wait(lambda: json.loads(shop("get", "ds", "-n", "shop", "agent", "-o", "json"))["status"]
          .get("numberReady") == 2)
    shop("cordon", "agent-0")
    node = json.loads(shop("get", "node", "agent-0", "-o", "json"))
    assert node["spec"]["unschedulable"] is True
    assert "SchedulingDisabled" in shop("get", "node", "agent-0")
    out = shop.run("drain", "agent-0", "--ignore-daemonsets", "--timeout=60s")
    assert out.returncode == 0, out.stderr
    pods = json.loads(shop("get", "pods", "-n", "shop", "-o", "json", "--field-selector", "spec.nodeName=agent-0"))
    kinds = {p["metadata"]["ownerReferences"][0]["kind"] for p in pods["items"]}
    assert kinds <= {"DaemonSet"}  # only the daemonset pod stays
    _wait(lambda: json.loads(shop("get", "deploy", "-n", "shop", "web", "-o", "json"))["status"]
          .get("availableReplicas") == 2)
    web = json.loads(shop("get", "pods", "-n", "shop", "-l", "app=web", "-o", "json"))["items"]
    assert all(p["spec"]["nodeName"] == "agent-1" for p in web if not p["metadata"].get("deletionTimestamp"))
    shop("uncordon", "agent-0")
    assert "SchedulingDisabled" not in shop("get", "node", "agent-0")


def test_delete_f_cascades(shop: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("ds2") / "ds.yaml"
    path.write_text(DAEMONSET)
    out = shop("delete", "-f", str(path), "--wait=true", "--timeout=30s")
    assert 'daemonset.apps "agent" deleted' in out
    _wait(lambda: not shop("get", "pods", "-n", "shop", "-l", "app=agent", "-o", "name").strip())


def test_api_resources_and_explain(kubectl: Kubectl) -> None:
    out = kubectl("api-resources")
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[1:]}
    assert rows["deployments"][1:] == ["deploy", "apps/v1", "true", "Deployment"]
    assert rows["nodes"][1:] == ["no", "v1", "false", "Node"]
    assert rows["priorityclasses"][1:] == ["pc", "scheduling.k8s.io/v1", "false", "PriorityClass"]
    assert "customresourcedefinitions" in rows and "leases" in rows
    exp = kubectl("explain", "deployment.spec.replicas")
    assert "KIND:       Deployment" in exp and "FIELD: replicas <integer>" in exp
    exp = kubectl("explain", "pods.spec.containers")
    assert "<[]Container>" in exp and "image\t<string>" in exp and "name\t<string> -required-" in exp
    assert "Pod is a collection of containers" in kubectl("explain", "pod")


def test_errors_are_status_objects(kubectl: Kubectl) -> None:
    proc = kubectl.run("get", "deploy", "-n", "default", "missing", check=False)
    assert proc.returncode == 1 and 'deployments.apps "missing" not found' in proc.stderr
    kubectl("create", "namespace", "dup-ns")  # protobuf body from the typed client
    proc = kubectl.run("create", "namespace", "dup-ns", check=False)
    assert 'namespaces "dup-ns" already exists' in proc.stderr
    svc = 'apiVersion: v1\nkind: Service\nmetadata: {name: bad.name, namespace: default}\nspec: {ports: [{port: 1}]}\n'
    proc = kubectl.run("apply", "--server-side", "-f", "-", check=False, stdin=svc)
    assert proc.returncode != 0 and 'Service "bad.name" is invalid' in proc.stderr and "DNS-1035" in proc.stderr
    cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: nowhere}\n"
    proc = kubectl.run("apply", "--server-side", "-f", "-", check=False, stdin=cm)
    assert 'namespaces "nowhere" not found' in proc.stderr
    old = "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: x, namespace: default}\n"
    proc = kubectl.run("apply", "--server-side", "-f", "-", check=False, stdin=old)
    assert 'no matches for kind "Deployment" in version "extensions/v1beta1"' in proc.stderr


def test_custom_resources_after_crd(kubectl: Kubectl) -> None:
    crd = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
    additionalPrinterColumns:
    - {name: Size, type: string, jsonPath: .spec.size}
"""
    cr = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1, namespace: default}\nspec: {size: big}\n"
    proc = kubectl.run("apply", "--server-side", "-f", "-", check=False, stdin=cr)
    assert 'no matches for kind "Widget"' in proc.stderr
    kubectl("apply", "--server-side", "-f", "-", stdin=crd)
    kubectl("wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=10s")
    kubectl("apply", "--server-side", "-f", "-", stdin=cr)
    out = kubectl("get", "wd", "-n", "default")
    assert out.split()[:6] == ["NAME", "SIZE", "AGE", "w1", "big", out.split()[5]]
    assert "widgets" in kubectl("api-resources", "--api-group=example.com")
    kubectl("delete", "crd", "widgets.example.com")
    proc = kubectl.run("get", "widgets.example.com", "-n", "default", check=False)
    assert proc.returncode != 0


def test_client_side_apply_describe_rollout_undo_and_auth(kubectl: Kubectl) -> None:
    dep = DEPLOY.split("---")[1].replace("name: web", "name: csa").replace("namespace: shop", "namespace: default")
    dep = dep.replace("app: web", "app: csa")
    assert "deployment.apps/csa created" in kubectl("apply", "-f", "-", stdin=dep)
    assert "deployment.apps/csa unchanged" in kubectl("apply", "-f", "-", stdin=dep)
    kubectl("rollout", "status", "deployment/csa", "--timeout=30s")
    described = kubectl("describe", "pods", "-l", "app=csa")
    assert "Successfully assigned default/csa-" in described and "default-scheduler" in described
    assert "node.kubernetes.io/unreachable:NoExecute op=Exists for 300s" in described
    kubectl("rollout", "restart", "deployment/csa")
    kubectl("rollout", "status", "deployment/csa", "--timeout=30s")
    assert "rolled back" in kubectl("rollout", "undo", "deployment/csa")
    kubectl("rollout", "status", "deployment/csa", "--timeout=30s")
    history = kubectl("rollout", "history", "deployment/csa")
    assert "3 " in history  # revisions 1 (undone into 3) and 2
    assert kubectl("auth", "can-i", "create", "pods").strip() == "yes"
    kubectl("delete", "deployment", "csa", "--wait=true", "--timeout=30s")
    _wait(lambda: not kubectl("get", "pods", "-l", "app=csa", "-o", "name").strip())
