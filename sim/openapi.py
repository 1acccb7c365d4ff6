"""OpenAPI v3 documents: what ``kubectl explain`` reads and what ``kubectl apply`` checks for fieldValidation.

Built-in schemas come from ``openapi_data/builtin.json`` (generated offline by ``sim.openapi_gen`` from
kubernetes-asyncio's models); custom resources get a document built from their CRD's ``openAPIV3Schema``.
Each group-version document holds the paths of its resources (with the ``x-kubernetes-group-version-kind``
and the ``fieldValidation`` parameter on PATCH, which is how kubectl decides to validate server-side) and the
transitive closure of the schemas they use. Built-in documents are cached as bytes after first use.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sim import resources
from sim.store import dumps

if TYPE_CHECKING:
    from sim.cluster import Cluster

_DATA = Path(__file__).with_name("openapi_data") / "builtin.json"
_DESCRIPTIONS = {
    "Pod": "Pod is a collection of containers that can run on a host. This resource is created by clients and "
           "scheduled onto hosts.",
    "Deployment": "Deployment enables declarative updates for Pods and ReplicaSets.",
    "ReplicaSet": "ReplicaSet ensures that a specified number of pod replicas are running at any given time.",
    "StatefulSet": "StatefulSet represents a set of pods with consistent identities.",
    "DaemonSet": "DaemonSet represents the configuration of a daemon set.",
    "Service": "Service is a named abstraction of software service (for example, mysql) consisting of local port "
               "(for example 3306) that the proxy listens on, and the selector that determines which pods will "
               "answer requests sent through the proxy.",
    "Node": "Node is a worker node in Kubernetes. Each node will have a unique identifier in the cache (i.e. in "
            "etcd).",
    "Namespace": "Namespace provides a scope for Names. Use of multiple namespaces is optional.",
    "ConfigMap": "ConfigMap holds configuration data for pods to consume.",
    "Secret": "Secret holds secret data of a certain type. The total bytes of the values in the Data field must be "
              "less than MaxSecretSize bytes.",
    "Job": "Job represents the configuration of a single job.",
    "PriorityClass": "PriorityClass defines mapping from a priority class name to the priority integer value. The "
                     "value can be any valid integer.",
    "Lease": "Lease defines a lease concept.",
    "CustomResourceDefinition": "CustomResourceDefinition represents a resource that should be exposed on the API "
                                "server.  Its name MUST be in the format <.spec.name>.<.spec.group>.",
}
_PARAMS = [{"name": n, "in": "query", "schema": {"type": "string" if n != "force" else "boolean"},
            "uniqueItems": True} for n in ("dryRun", "fieldManager", "fieldValidation", "force")]


@functools.cache
def _builtin() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_DATA.read_text())
    return data


def _path(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def root(registry: resources.Registry) -> dict[str, Any]:
    paths = {}
    for group in ["", *registry.groups()]:
        for version in registry.group_versions(group):
            p = _path(group, version)
            paths[p] = {"serverRelativeURL": f"/openapi/v3/{p}?hash=sim{registry.generation}"}
    return {"paths": paths}


def _ops(res: resources.Resource) -> dict[str, Any]:
    gvk = {"group": res.group, "version": res.version, "kind": res.kind}
    prefix = "/" + _path(res.group, res.version)
    coll = f"{prefix}/namespaces/{{namespace}}/{res.plural}" if res.namespaced else f"{prefix}/{res.plural}"
    ref = {"$ref": f"#/components/schemas/{_schema_name(res)}"}
    body = {"content": {"application/json": {"schema": ref}}, "required": True}
    ok = {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}}

    def op(verb: str, action: str, **extra: Any) -> dict[str, Any]:
        return {"operationId": f"{verb}{res.kind}", "responses": ok, "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk, **extra}

    return {
        coll: {"get": op("list", "list"), "post": op("create", "post", requestBody=body, parameters=_PARAMS)},
        f"{coll}/{{name}}": {
            "get": op("read", "get"), "put": op("replace", "put", requestBody=body, parameters=_PARAMS),
            "patch": op("patch", "patch", parameters=_PARAMS,
                        requestBody={"content": {t: {"schema": {"type": "object"}} for t in (
                            "application/apply-patch+yaml", "application/json-patch+json",
                            "application/merge-patch+json", "application/strategic-merge-patch+json")}}),
            "delete": op("delete", "delete"),
        },
    }


def _schema_name(res: resources.Resource) -> str:
    if res.custom:
        rev = ".".join(reversed(res.group.split(".")))
        return f"{rev}.{res.version}.{res.kind}"
    return f"io.k8s.api.{res.group or 'core'}.{res.version}.{res.kind}"


def _closure(names: list[str], schemas: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    todo = list(names)
    while todo:
        n = todo.pop()
        if n in out or n not in schemas:
            continue
        out[n] = schemas[n]
        text = json.dumps(schemas[n])
        start = 0
        while True:
            i = text.find("#/components/schemas/", start)
            if i < 0:
                break
            j = text.find('"', i)
            todo.append(text[i + len("#/components/schemas/"):j])
            start = j
    return out


@functools.lru_cache(maxsize=32)
def _builtin_doc(group: str, version: str, generation: int, plurals: tuple[str, ...]) -> bytes:
    data = _builtin()
    registry_res = [r for r in resources.BUILTIN if r.group == group and r.version == version and r.plural in plurals]
    paths: dict[str, Any] = {}
    names = []
    for res in registry_res:
        key = f"{res.group}/{res.version}/{res.kind}"
        if key in data["kinds"]:
            names.append(data["kinds"][key])
            paths.update(_ops(res))
    schemas = _closure(names, data["schemas"])
    for res in registry_res:
        name = _schema_name(res)
        if name in schemas and res.kind in _DESCRIPTIONS:
            schemas[name] = dict(schemas[name], description=_DESCRIPTIONS[res.kind])
    return dumps({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.4+k3s1"}, "paths": paths,
                  "components": {"schemas": schemas}})


def _crd_doc(cluster: Cluster, group: str, version: str) -> bytes:
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for res in cluster.registry.resources_in(group, version):
        crd = cluster.api.get(("apiextensions.k8s.io", "customresourcedefinitions"), "", f"{res.plural}.{group}")
        if crd is None:
            continue
        versions = (crd.get("spec") or {}).get("versions") or []
        ver: dict[str, Any] = next((v for v in versions if v.get("name") == version), {})
        schema = dict(((ver.get("schema") or {}).get("openAPIV3Schema")) or {"type": "object"})
        schema["x-kubernetes-group-version-kind"] = [{"group": group, "version": version, "kind": res.kind}]
        props = dict(schema.get("properties") or {})
        props["metadata"] = {"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1."
                                                 "ObjectMeta"}]}
        schema["properties"] = props
        schemas[_schema_name(res)] = schema
        paths.update(_ops(res))
    schemas.update(_closure(["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"], _builtin()["schemas"]))
    return dumps({"openapi": "3.0.0", "info": {"title": "Kubernetes CRD Swagger", "version": "v0.1.0"},
                  "paths": paths, "components": {"schemas": schemas}})


def document(cluster: Cluster, gv: str) -> bytes | None:
    parts = gv.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "api":
        group, version = "", parts[1]
    elif len(parts) == 3 and parts[0] == "apis":
        group, version = parts[1], parts[2]
    else:
        return None
    served = cluster.registry.resources_in(group, version)
    if not served:
        return None
    if any(r.custom for r in served):
        return _crd_doc(cluster, group, version)
    return _builtin_doc(group, version, 0, tuple(sorted(r.plural for r in served)))
