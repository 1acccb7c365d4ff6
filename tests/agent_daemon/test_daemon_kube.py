"""agent/kube.py against the sim: real kubernetes-asyncio auth/TLS code paths, SSA, discovery, outages."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemon_helpers import ROOT

from agent import kube

sim_testing = pytest.importorskip("sim.testing")


def test_agent_import_keeps_generated_client_unloaded() -> None:
    """The memory decision (docs/operations.md, "Memory"), checked in a fresh interpreter."""
    code = (
        "import sys, json; import agent.daemon; from agent import kube; "
        "mods = [m for m in sys.modules if m.startswith('kubernetes_asyncio')]; "
        "print(json.dumps({'lazy': kube.is_lazy(), 'mods': mods}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["lazy"] is True
    assert not [
        m for m in doc["mods"] if m.startswith(("kubernetes_asyncio.client.api.", "kubernetes_asyncio.client.models."))
    ]
    assert len(doc["mods"]) < 30, doc["mods"]


def test_agent_modules_import_kubernetes_asyncio_only_through_agent_kube() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "agent").rglob("*.py")
        if path.name != "kube.py" and re.search(r"^\s*(from|import)\s+kubernetes_asyncio", path.read_text(), re.M)
    ]
    assert not offenders, f"import kubernetes-asyncio via agent.kube (docs/operations.md, Memory): {offenders}"


def test_lazy_packages_still_serve_code_that_wants_the_full_client() -> None:
    code = (
        "import agent.kube as k; from kubernetes_asyncio import client; "
        "from kubernetes_asyncio.client import V1ConfigMap; "
        "assert client.CoreV1Api and V1ConfigMap and client.ApiClient is k.ApiClient; "
        "import kubernetes_asyncio; assert kubernetes_asyncio.__version__; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


async def test_tls_token_ssa_get_list_patch_delete(tmp_path: Path) -> None:
    async with sim_testing.running(nodes=["server-0"], tls=True, token="s3cret-token") as site:
        async with kube.connect(site.kubeconfig) as api:
            assert "gitVersion" in await kube.ping(api)
            cm = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "cfg",
                    "namespace": "default",
                    "labels": {"app.kubernetes.io/managed-by": "edgefleet"},
                },
                "data": {"a": "1"},
            }
            live = await kube.apply(api, cm)
            assert live["data"] == {"a": "1"}
            assert any(m.get("manager") == "edgefleet" for m in live["metadata"].get("managedFields", []))
            live = await kube.apply(api, {**cm, "data": {"a": "2", "b": "3"}})  # idempotent re-apply updates
            assert live["data"] == {"a": "2", "b": "3"}

            got = await kube.get(api, "v1", "ConfigMap", "cfg", namespace="default")
            assert got is not None and got["data"]["b"] == "3"
            listed = await kube.list_objects(
                api, "v1", "ConfigMap", label_selector="app.kubernetes.io/managed-by=edgefleet"
            )
            assert [o["metadata"]["name"] for o in listed] == ["cfg"]
            assert listed[0]["kind"] == "ConfigMap"
            assert "managedFields" not in listed[0]["metadata"] and listed[0]["data"] == got["data"]
            full = await kube.list_objects(api, "v1", "ConfigMap", namespace="default", managed_fields=True)
            assert full[0]["metadata"]["managedFields"] == got["metadata"]["managedFields"]

            patched = await kube.patch(api, "v1", "ConfigMap", "cfg", {"data": {"c": "4"}}, namespace="default")
            assert patched["data"]["c"] == "4"

            ns = await kube.apply(api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "platform"}})
            assert ns["metadata"]["name"] == "platform"
            dep = await kube.apply(
                api,
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "web", "namespace": "platform"},
                    "spec": {
                        "replicas": 1,
                        "selector": {"matchLabels": {"app": "web"}},
                        "template": {
                            "metadata": {"labels": {"app": "web"}},
                            "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
                        },
                    },
                },
            )
            assert dep["spec"]["replicas"] == 1

            assert await kube.delete(api, "v1", "ConfigMap", "cfg", namespace="default") is True
            assert await kube.get(api, "v1", "ConfigMap", "cfg", namespace="default") is None
            assert await kube.delete(api, "v1", "ConfigMap", "cfg", namespace="default") is False

            with pytest.raises(kube.UnknownKind):
                await kube.resource_for(api, "v1", "NoSuchKind")
            with pytest.raises(ValueError, match="metadata.name"):
                await kube.apply(api, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}})

        # Wrong credentials: an API answer (401), not "unavailable".
        doc = yaml.safe_load(site.kubeconfig.read_text())
        doc["users"][0]["user"]["token"] = "wrong"
        bad = tmp_path / "bad-kubeconfig"
        bad.write_text(yaml.safe_dump(doc))
        kube.last_contact = None
        async with kube.connect(bad) as api:
            with pytest.raises(kube.KubeError) as info:
                await kube.ping(api)
            assert info.value.status == 401 and not isinstance(info.value, kube.KubeUnavailable)
        assert kube.last_contact is None, "a 401 is no usable contact (readiness must not pass on it)"


async def test_discovery_picks_up_a_crd_once_established() -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.io"},
        "spec": {
            "group": "example.io",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }
    async with sim_testing.running(nodes=["server-0"]) as site, kube.connect(site.kubeconfig) as api:
        with pytest.raises(kube.UnknownKind):
            await kube.resource_for(api, "example.io/v1", "Widget")  # cached as "no such kind" for now
        await kube.apply(api, crd)
        for _ in range(100):
            live = await kube.get(api, "apiextensions.k8s.io/v1", "CustomResourceDefinition", "widgets.example.io")
            conditions = {c["type"]: c["status"] for c in (live or {}).get("status", {}).get("conditions", [])}
            if conditions.get("Established") == "True":
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("CRD never became Established")
        widget = {"apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w1", "namespace": "default"}}
        live = await kube.apply(api, widget)
        assert live["metadata"]["name"] == "w1"
        resource = await kube.resource_for(api, "example.io/v1", "Widget")
        assert resource.plural == "widgets" and resource.namespaced
        assert resource.path(namespace="default", name="w1") == "/apis/example.io/v1/namespaces/default/widgets/w1"


async def test_unreachable_api_raises_kube_unavailable(tmp_path: Path) -> None:
    async with sim_testing.running(nodes=["server-0"]) as site:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(site.kubeconfig.read_text())
    # The sim is gone now: same kubeconfig, nobody listening.
    async with kube.connect(kubeconfig) as api:
        with pytest.raises(kube.KubeUnavailable):
            await kube.ping(api)
        with pytest.raises(kube.KubeUnavailable):
            await kube.get(api, "v1", "ConfigMap", "x", namespace="default")

    with pytest.raises(kube.KubeConfigError):
        async with kube.connect(tmp_path / "missing"):
            pass
    garbage = tmp_path / "garbage"
    for text in ("{not: [yaml", "just a string", "apiVersion: v1\nkind: Config\nclusters: 7\n"):
        garbage.write_text(text)
        with pytest.raises(kube.KubeConfigError, match="kubeconfig"):
            async with kube.connect(garbage):
                pass


async def test_tls_server_is_verified_against_the_kubeconfig_ca(tmp_path: Path) -> None:
    """A server whose certificate the kubeconfig's CA did not sign is refused (no silent trust)."""
    from sim import certs

    other_ca, _, _ = certs.generate(tmp_path / "other-pki")
    async with sim_testing.running(nodes=["server-0"], tls=True, token="t0ken") as site:
        doc = yaml.safe_load(site.kubeconfig.read_text())
        doc["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(other_ca.read_bytes()).decode()
        wrong = tmp_path / "wrong-ca-kubeconfig"
        wrong.write_text(yaml.safe_dump(doc))
        async with kube.connect(wrong) as api:
            with pytest.raises(kube.KubeUnavailable, match="(?i)certificate"):
                await kube.ping(api)
        async with kube.connect(site.kubeconfig) as api:  # the right CA still works
            assert await kube.ping(api)


async def test_tls_reads_in_small_buffers_and_big_answers_arrive_whole() -> None:
    """After connecting, asyncio's TLS transport reads 64 KiB at a time (it kept 256 KiB per
    connection), bytes bodies go out in pieces, the pool is bounded, and a ~900 KB object still
    goes out and comes back intact over TLS: the raw apply path (head only) and a full GET."""
    from asyncio import sslproto

    import aiohttp.payload

    async with (sim_testing.running(nodes=["server-0"], tls=True, token="s3cret-token") as site,
                kube.connect(site.kubeconfig) as api):
        assert sslproto.SSLProtocol.max_size == kube.TLS_READ_BUFFER == 64 * 1024
        assert api.rest_client.pool_manager.connector.limit == kube.MAX_CONNECTIONS
        assert type(aiohttp.payload.get_payload(b"{}")).__name__ == "_ChunkedBytesPayload"
        blob = "".join(f"{i:07d}" for i in range(130_000))  # 910 KB, no repeats to compress away
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big", "namespace": "default"},
              "data": {"blob": blob}}
        body = json.dumps(cm).encode()
        head = await kube.apply(api, cm, body=body, fields=("metadata",))
        assert head["metadata"]["name"] == "big"
        got = await kube.get(api, "v1", "ConfigMap", "big", namespace="default")
        assert got["data"]["blob"] == blob
