"""kubernetes-asyncio's typed and dynamic clients against the sim: the agent's real code paths."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.dynamic import DynamicClient

import sim.testing


def _deployment(name: str, replicas: int = 1, **spec: object) -> dict[str, object]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}], **spec}}}}


async def _api(site: sim.testing.Site) -> client.ApiClient:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(site.kubeconfig), client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


async def _until(fn, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_typed_crud_conflict_and_errors() -> None:
    async with sim.testing.running(speed=50) as site, await _api(site) as api:
        core = client.CoreV1Api(api)
        cm = await core.create_namespaced_config_map("default", {"metadata": {"name": "c1"}, "data": {"a": "1"}})
        assert cm.metadata.resource_version and cm.metadata.uid
        with pytest.raises(ApiException) as exc:
            await core.create_namespaced_config_map("default", {"metadata": {"name": "c1"}})
        assert exc.value.status == 409 and json.loads(exc.value.body)["reason"] == "AlreadyExists"
        stale = cm.metadata.resource_version
        cm.data["a"] = "2"
        cm2 = await core.replace_namespaced_config_map("c1", "default", cm)
        assert int(cm2.metadata.resource_version) > int(stale)
        cm.metadata.resource_version = stale
        with pytest.raises(ApiException) as exc:
            await core.replace_namespaced_config_map("c1", "default", cm)
        body = json.loads(exc.value.body)
        assert exc.value.status == 409 and body["kind"] == "Status" and body["reason"] == "Conflict"
        with pytest.raises(ApiException) as exc:
            await core.read_namespaced_config_map("nope", "default")
        assert exc.value.status == 404 and json.loads(exc.value.body)["details"] == {"name": "nope",
                                                                                    "kind": "configmaps"}
        with pytest.raises(ApiException) as exc:
            await core.create_namespaced_config_map("default", {"metadata": {"name": "Bad_Name"}})
        body = json.loads(exc.value.body)
        assert exc.value.status == 422 and body["reason"] == "Invalid"
        assert body["details"]["causes"][0]["field"] == "metadata.name"
        # no-op update does not bump the resourceVersion (as an etcd-backed server)
        same = await core.replace_namespaced_config_map("c1", "default", cm2)
        assert same.metadata.resource_version == cm2.metadata.resource_version


async def test_list_selectors_and_pagination() -> None:
    async with sim.testing.running(speed=50) as site, await _api(site) as api:
        core = client.CoreV1Api(api)
        for i in range(7):
            await core.create_namespaced_config_map(
                "default", {"metadata": {"name": f"cm-{i}", "labels": {"n": str(i % 2), "k": "v"}}})
        odd = await core.list_namespaced_config_map("default", label_selector="n=1,k in (v,w)")
        assert sorted(c.metadata.name for c in odd.items) == ["cm-1", "cm-3", "cm-5"]
        notodd = await core.list_namespaced_config_map("default", label_selector="n!=1,k")
        assert len(notodd.items) == 4
        named = await core.list_namespaced_config_map("default", field_selector="metadata.name=cm-2")
        assert [c.metadata.name for c in named.items] == ["cm-2"]
        seen = []
        page = await core.list_namespaced_config_map("default", limit=3, label_selector="k=v")
        seen += [c.metadata.name for c in page.items]
        while page.metadata._continue:
            page = await core.list_namespaced_config_map("default", limit=3, label_selector="k=v",
                                                         _continue=page.metadata._continue)
            seen += [c.metadata.name for c in page.items]
        assert seen == [f"cm-{i}" for i in range(7)]
        with pytest.raises(ApiException) as exc:
            await core.list_namespaced_pod("default", field_selector="spec.bogus=1")
        assert exc.value.status == 400
        nodes = await core.list_node()
        running = await core.list_pod_for_all_namespaces(field_selector="status.phase=Running")
        assert len(nodes.items) == 3 and running.items == []


async def test_field_selectors_of_services_and_custom_resources() -> None:
    """Services select on spec.type/spec.clusterIP (1.31+: kube-proxy lists ``spec.clusterIP!=None``); custom
    resources only on metadata.* and their CRD version's ``selectableFields`` (GA in 1.32), whatever their kind."""
    async with sim.testing.running(speed=50) as site, await _api(site) as api:
        core = client.CoreV1Api(api)
        await core.create_namespaced_service("default", {"metadata": {"name": "headless"},
                                                         "spec": {"clusterIP": "None", "ports": [{"port": 1}]}})
        await core.create_namespaced_service("default", {"metadata": {"name": "np"},
                                                         "spec": {"type": "NodePort", "ports": [{"port": 2}]}})
        names = await core.list_namespaced_service("default", field_selector="spec.clusterIP!=None")
        assert sorted(s.metadata.name for s in names.items) == ["kubernetes", "np"]
        names = await core.list_service_for_all_namespaces(field_selector="spec.type=NodePort")
        assert [s.metadata.name for s in names.items] == ["np"]
        with pytest.raises(ApiException) as exc:
            await core.list_namespaced_service("default", field_selector="spec.ports=1")
        assert exc.value.status == 400 and "field label not supported: spec.ports" in exc.value.body
        crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": "jobs.example.com"},
               "spec": {"group": "example.com", "scope": "Namespaced",
                        "names": {"plural": "jobs", "singular": "job", "kind": "Job"},
                        "versions": [{"name": "v1", "served": True, "storage": True,
                                      "schema": {"openAPIV3Schema": {"type": "object",
                                                                     "x-kubernetes-preserve-unknown-fields": True}},
                                      "selectableFields": [{"jsonPath": ".spec.color"}]}]}}
        dyn = await DynamicClient(api)
        crds = await dyn.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
        await crds.server_side_apply(body=crd, field_manager="test")
        await _until(lambda: _eq(_status(site, "/apis/example.com/v1/jobs"), 200))
        base = site.url + "/apis/example.com/v1/namespaces/default/jobs"
        async with aiohttp.ClientSession() as s:
            for name, color in (("a", "red"), ("b", "blue")):
                async with s.post(base, json={"apiVersion": "example.com/v1", "kind": "Job",
                                              "metadata": {"name": name}, "spec": {"color": color}}) as resp:
                    assert resp.status == 201
            async with s.get(base, params={"fieldSelector": "spec.color=red"}) as resp:
                assert [o["metadata"]["name"] for o in (await resp.json())["items"]] == ["a"]
            async with s.get(base, params={"fieldSelector": "metadata.name!=a"}) as resp:
                assert [o["metadata"]["name"] for o in (await resp.json())["items"]] == ["b"]
            # a built-in Job's field is no field of this custom "Job"
            async with s.get(base, params={"fieldSelector": "status.successful=1"}) as resp:
                assert resp.status == 400 and (await resp.json())["reason"] == "BadRequest"


async def test_watch_resume_after_410_and_bookmarks() -> None:
    async with sim.testing.running(speed=50) as site, await _api(site) as api:
        core = client.CoreV1Api(api)
        first = await core.create_namespaced_config_map("default", {"metadata": {"name": "w0"}})
        rv0 = first.metadata.resource_version
        await core.create_namespaced_config_map("default", {"metadata": {"name": "w1"}})
        # resuming from an old-but-retained resourceVersion replays what happened since
        w = watch.Watch()
        events = []
        async for ev in w.stream(core.list_namespaced_config_map, "default", resource_version=rv0,
                                 timeout_seconds=1):
            events.append((ev["type"], ev["object"].metadata.name))
        assert events == [("ADDED", "w1")]
        site.cluster.store.compact()
        with pytest.raises(ApiException) as exc:
            async for _ in watch.Watch().stream(core.list_namespaced_config_map, "default", resource_version=rv0,
                                                timeout_seconds=2):
                pass
        assert exc.value.status == 410
        # the client's recovery: re-list, then watch from the list's resourceVersion
        listed = await core.list_namespaced_config_map("default")
        w = watch.Watch()
        got: list[tuple[str, str]] = []

        async def consume() -> None:
            async for ev in w.stream(core.list_namespaced_config_map, "default",
                                     resource_version=listed.metadata.resource_version,
                                     allow_watch_bookmarks=True, timeout_seconds=3):
                got.append((ev["type"], ev["raw_object"]["metadata"].get("name", "")))
                if ev["type"] == "DELETED":
                    w.stop()

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        await core.create_namespaced_config_map("default", {"metadata": {"name": "w2"}})
        await core.patch_namespaced_config_map("w2", "default", {"data": {"x": "y"}})
        await asyncio.sleep(1.2)  # long enough for a bookmark
        await core.delete_namespaced_config_map("w2", "default")
        await asyncio.wait_for(task, 10)
        kinds = [t for t, _ in got]
        assert ("ADDED", "w2") in got and ("MODIFIED", "w2") in got and ("DELETED", "w2") in got
        assert "BOOKMARK" in kinds


async def test_dynamic_client_apply_and_crd_lifecycle() -> None:
    async with sim.testing.running(speed=50) as site, await _api(site) as api:
        dyn = await DynamicClient(api)
        crds = await dyn.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
        crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": "gadgets.example.com"},
               "spec": {"group": "example.com", "scope": "Cluster",
                        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
                        "versions": [{"name": "v1", "served": True, "storage": True,
                                      "schema": {"openAPIV3Schema": {"type": "object",
                                                                     "x-kubernetes-preserve-unknown-fields": True}},
                                      "subresources": {"status": {}}}]}}
        site.cluster.timing.crd_establish = 5.0  # 0.1 s real at speed 50: observe the window before Established
        await crds.server_side_apply(body=crd, field_manager="test")
        assert await _status(site, "/apis/example.com/v1/gadgets") == 404  # not served before Established

        async def established() -> bool:
            obj = await crds.get(name="gadgets.example.com")
            return any(c["type"] == "Established" and c["status"] == "True" for c in obj.status.conditions or [])

        await _until(established)
        gadgets = await dyn.resources.get(api_version="example.com/v1", kind="Gadget")
        g = await gadgets.create(body={"apiVersion": "example.com/v1", "kind": "Gadget",
                                       "metadata": {"name": "g1"}, "spec": {"n": 1}, "status": {"x": 1}})
        assert g.metadata.generation == 1 and "status" not in g.to_dict()  # status only via the subresource
        g = await gadgets.patch(name="g1", body={"spec": {"n": 2}}, content_type="application/merge-patch+json")
        assert g.metadata.generation == 2
        g = await gadgets.patch(name="g1", body={"metadata": {"labels": {"a": "b"}}},
                                content_type="application/merge-patch+json")
        assert g.metadata.generation == 2  # metadata changes keep the generation
        # SSA: the merge patch above made its (Update) manager own spec.n, so applying another value conflicts.
        # (kubernetes-asyncio's dynamic client returns the 409 Status instead of raising.)
        def gadget(n: object, key: str = "n") -> dict[str, object]:
            return {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g1"}, "spec": {key: n}}

        r = await gadgets.server_side_apply(body=gadget(3), field_manager="a")
        assert (r.kind, r.code, r.reason) == ("Status", 409, "Conflict")
        assert r.details.causes[0].field == ".spec.n" and 'conflict with "OpenAPI-Generator"' in r.message
        g = await gadgets.server_side_apply(body=gadget(3), field_manager="a", force_conflicts=True)
        assert g.spec.n == 3
        r = await gadgets.server_side_apply(body=gadget(4), field_manager="b")
        assert r.code == 409 and 'conflict with "a" using example.com/v1: .spec.n' in r.message
        same = await gadgets.server_side_apply(body=gadget(3), field_manager="b")  # same value: shared, no conflict
        assert same.spec.n == 3
        g = await gadgets.server_side_apply(body=gadget(4), field_manager="b", force_conflicts=True)
        assert g.spec.n == 4
        owners = {m["manager"]: m for m in g.to_dict()["metadata"]["managedFields"]}
        assert "f:n" in json.dumps(owners["b"]["fieldsV1"]) and "a" not in owners  # a lost its only field
        # a manager that stops applying a field removes it
        await gadgets.server_side_apply(body=gadget(1, "m"), field_manager="c")
        g = await gadgets.server_side_apply(body={"apiVersion": "example.com/v1", "kind": "Gadget",
                                                  "metadata": {"name": "g1"}, "spec": {}}, field_manager="c")
        assert "m" not in g.spec and g.spec.n == 4
        await crds.delete(name="gadgets.example.com")
        await _until(lambda: _eq(_status(site, "/apis/example.com/v1/gadgets"), 404))


async def _status(site: sim.testing.Site, path: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(site.url + path) as resp:
        if resp.status != 200:
            body = await resp.json()
            assert body["kind"] == "Status" and body["code"] == resp.status
        return resp.status


async def test_cascading_delete_policies_and_finalizers() -> None:
    async with sim.testing.running(speed=50) as site, await _api(site) as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)

        async def rs_count(name: str) -> int:
            rs = await apps.list_namespaced_replica_set("default", label_selector=f"app={name}")
            return len(rs.items)

        for name in ("bg", "orph", "fg"):
            await apps.create_namespaced_deployment("default", _deployment(name, 2))
            await _until(lambda name=name: rs_count(name))
        await apps.delete_namespaced_deployment("bg", "default")
        await _until(lambda: _eq(rs_count("bg"), 0))
        await apps.delete_namespaced_deployment("orph", "default", propagation_policy="Orphan")
        await asyncio.sleep(0.3)
        rs = (await apps.list_namespaced_replica_set("default", label_selector="app=orph")).items
        assert len(rs) == 1 and not rs[0].metadata.owner_references
        before = (await apps.list_namespaced_deployment("default")).metadata.resource_version
        await apps.delete_namespaced_deployment("fg", "default", propagation_policy="Foreground")

        async def fg_gone() -> bool:
            try:
                await apps.read_namespaced_deployment("fg", "default")
            except ApiException as exc:
                return exc.status == 404
            return False

        await _until(fg_gone)
        assert await rs_count("fg") == 0
        # the owner stayed (marked, with the foregroundDeletion finalizer) until its dependents were gone
        seen = []
        async for ev in watch.Watch().stream(apps.list_namespaced_deployment, "default", resource_version=before,
                                             field_selector="metadata.name=fg", timeout_seconds=1):
            meta = ev["raw_object"]["metadata"]
            seen.append((ev["type"], bool(meta.get("deletionTimestamp")), tuple(meta.get("finalizers") or ())))
        marked = [e for e in seen if e[1]]  # (status updates of the still-rolling deployment may come first)
        assert marked[0] == ("MODIFIED", True, ("foregroundDeletion",)) and seen[-1][0] == "DELETED"
        # finalizers hold deletion until removed
        await core.create_namespaced_config_map("default", {"metadata": {"name": "held", "finalizers": ["x/y"]}})
        await core.delete_namespaced_config_map("held", "default")
        held = await core.read_namespaced_config_map("held", "default")
        assert held.metadata.deletion_timestamp
        await core.patch_namespaced_config_map("held", "default", {"metadata": {"finalizers": None}})
        with pytest.raises(ApiException) as exc:
            await core.read_namespaced_config_map("held", "default")
        assert exc.value.status == 404
        # deletecollection
        for i in range(3):
            await core.create_namespaced_config_map("default", {"metadata": {"name": f"dc{i}",
                                                                             "labels": {"grp": "dc"}}})
        await core.delete_collection_namespaced_config_map("default", label_selector="grp=dc")
        left = await core.list_namespaced_config_map("default", label_selector="grp=dc")
        assert left.items == []
        # namespace deletion removes its content, then the namespace
        await core.create_namespace({"metadata": {"name": "tmp"}})
        await apps.create_namespaced_deployment("tmp", _deployment("x"))
        # (the response is the namespace, marked; reading it afterwards races the namespace controller)
        resp = await core.delete_namespace("tmp", _preload_content=False)
        marked_ns = json.loads(await resp.read())
        assert marked_ns["kind"] == "Namespace" and marked_ns["status"]["phase"] == "Terminating"

        async def ns_gone() -> bool:
            try:
                await core.read_namespace("tmp")
            except ApiException as exc:
                return exc.status == 404
            return False

        await _until(ns_gone)
        with pytest.raises(ApiException) as exc:
            await core.create_namespaced_config_map("tmp", {"metadata": {"name": "late"}})
        assert exc.value.status == 404


async def _eq(coro, want: int) -> bool:  # type: ignore[no-untyped-def]
    return await coro == want


async def test_scale_and_status_subresources() -> None:
    async with sim.testing.running(speed=50) as site, await _api(site) as api:
        apps = client.AppsV1Api(api)
        await apps.create_namespaced_deployment("default", _deployment("s", 1))
        scale = await apps.read_namespaced_deployment_scale("s", "default")
        assert scale.spec.replicas == 1 and scale.status.selector == "app=s"
        await apps.patch_namespaced_deployment_scale("s", "default", {"spec": {"replicas": 3}})

        async def ready() -> bool:
            d = await apps.read_namespaced_deployment_status("s", "default")
            return d.status.ready_replicas == 3 and d.status.updated_replicas == 3

        await _until(ready)
        d = await apps.read_namespaced_deployment("s", "default")
        conds = {c.type: (c.status, c.reason) for c in d.status.conditions}
        assert conds == {"Available": ("True", "MinimumReplicasAvailable"),
                         "Progressing": ("True", "NewReplicaSetAvailable")}
        # writes to the main resource ignore status
        d.status.ready_replicas = 99
        d2 = await apps.replace_namespaced_deployment("s", "default", d)
        assert d2.status.ready_replicas == 3


async def test_raw_http_status_codes() -> None:
    async with sim.testing.running(speed=50) as site, aiohttp.ClientSession() as s:
        base = site.url + "/api/v1/namespaces/default/configmaps"

        async def call(method: str, url: str, **kw: object) -> tuple[int, dict[str, object]]:
            async with s.request(method, url, **kw) as resp:  # type: ignore[arg-type]
                return resp.status, await resp.json()

        code, body = await call("POST", base, data=b"{not json", headers={"Content-Type": "application/json"})
        assert code == 400 and body["reason"] == "BadRequest"
        code, body = await call("POST", base, json={"metadata": {"name": "a"}})
        assert code == 201 and body["metadata"]["name"] == "a"
        code, body = await call("POST", base + "/a", json={"metadata": {"name": "a"}})
        assert code == 405 and body["reason"] == "MethodNotAllowed"
        code, body = await call("PATCH", base + "/a", data=b"{}", headers={"Content-Type": "text/plain"})
        assert code == 415 and body["reason"] == "UnsupportedMediaType"
        code, body = await call("GET", site.url + "/apis/nope.example.com/v1/things")
        assert code == 404 and body["kind"] == "Status"
        code, body = await call("POST", base, json={"metadata": {"name": "b", "namespace": "other"}})
        assert code == 400 and "does not match the namespace" in str(body["message"])
        code, body = await call("GET", site.url + "/api/v1/pods?fieldSelector=spec.nodeName%3Dagent-0")
        assert code == 200 and body["kind"] == "PodList"
        for i in range(3):
            await call("POST", base, json={"metadata": {"name": f"p{i}"}})
        code, page = await call("GET", base + "?limit=1")
        token = page["metadata"]["continue"]  # type: ignore[index]
        await call("POST", base, json={"metadata": {"name": "later"}})
        site.cluster.store.compact()  # the list's revision is now older than the compacted history
        code, body = await call("GET", base + f"?limit=1&continue={token}")
        assert code == 410 and body["reason"] == "Expired"
        code, body = await call("GET", site.url + "/version")
        assert (body["major"], body["minor"]) == ("1", "33")
        async with s.get(site.url + "/apis", headers={
                "Accept": "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"}) as resp:
            assert resp.headers["Content-Type"].startswith("application/json;g=apidiscovery.k8s.io;v=v2")
            groups = {g["metadata"]["name"] for g in (await resp.json())["items"]}
        assert {"apps", "batch", "coordination.k8s.io", "scheduling.k8s.io", "apiextensions.k8s.io"} <= groups
