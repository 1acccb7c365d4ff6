"""Offline generator of ``sim/openapi_data/builtin.json`` from kubernetes-asyncio's generated models.

Run ``python -m sim.openapi_gen`` after upgrading kubernetes-asyncio. The sim itself never imports
kubernetes-asyncio (it would cost ~40 MiB and seconds of startup); it serves the JSON this writes.
Model property docstrings carry the upstream field descriptions; ``required`` is found by asking each model's
setter to accept None. Top-level kinds carry ``x-kubernetes-group-version-kind``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sim import patching, resources

OUT = Path(__file__).with_name("openapi_data") / "builtin.json"
_PRIM: dict[str, dict[str, Any]] = {"str": {"type": "string"}, "int": {"type": "integer", "format": "int32"},
         "float": {"type": "number", "format": "double"}, "bool": {"type": "boolean"},
         "datetime": {"type": "string", "format": "date-time"}, "date": {"type": "string", "format": "date"},
         "object": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
_SPECIAL = {"V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
            "V1ListMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta",
            "V1LabelSelector": "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector",
            "V1OwnerReference": "io.k8s.apimachinery.pkg.apis.meta.v1.OwnerReference",
            "V1ManagedFieldsEntry": "io.k8s.apimachinery.pkg.apis.meta.v1.ManagedFieldsEntry"}


def _short(cls_name: str) -> str:
    return re.sub(r"^(Core|Events|Storage|Discovery|Authentication|Apiextensions|Apiregistration|Admissionregistration|"
                  r"Flowcontrol|Rbac|Networking|Policy)?V\d+(alpha\d+|beta\d+)?", "", cls_name) or cls_name


_ASSIGNED: dict[str, str] = {}


def _name(cls_name: str) -> str:
    if cls_name in _SPECIAL:
        return _SPECIAL[cls_name]
    if cls_name not in _ASSIGNED:
        short = f"io.k8s.api.sim.{_short(cls_name)}"
        taken = short in _ASSIGNED.values()
        _ASSIGNED[cls_name] = f"io.k8s.api.sim.{cls_name}" if taken else short
    return _ASSIGNED[cls_name]


def _list_extensions(cls_name: str, field: str) -> dict[str, Any]:
    """Strategic-merge and list-type markers, which kubectl's three-way apply patch computation reads."""
    if field == "finalizers":
        return {"x-kubernetes-list-type": "set", "x-kubernetes-patch-strategy": "merge"}
    keys: tuple[str, ...] | None
    if field == "ports":
        keys = {"V1Container": ("containerPort", "protocol"), "V1EphemeralContainer": ("containerPort", "protocol"),
                "V1ServiceSpec": ("port", "protocol")}.get(cls_name)
    else:
        keys = patching.MERGE_KEYS.get(field)
    if not keys:
        return {}
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys),
            "x-kubernetes-patch-merge-key": keys[0], "x-kubernetes-patch-strategy": "merge"}


def _description(cls: Any, attr: str) -> str:
    doc = getattr(cls, attr).__doc__ or ""
    lines = [ln.strip().replace("  # noqa: E501", "") for ln in doc.splitlines()]
    body = [ln for ln in lines[1:] if ln and not ln.startswith(":return:") and not ln.startswith(":rtype:")]
    return " ".join(body).strip()


def main() -> None:
    from kubernetes_asyncio.client import Configuration, models

    schemas: dict[str, Any] = {}
    kinds: dict[str, str] = {}

    def type_schema(t: str) -> dict[str, Any]:
        if t in _PRIM:
            return dict(_PRIM[t])
        m = re.match(r"^list\[(.+)\]$", t)
        if m:
            return {"type": "array", "items": type_schema(m.group(1))}
        m = re.match(r"^dict\(str, (.+)\)$", t)
        if m:
            return {"type": "object", "additionalProperties": type_schema(m.group(1))}
        visit(t)
        return {"allOf": [{"$ref": f"#/components/schemas/{_name(t)}"}]}

    def visit(cls_name: str) -> None:
        name = _name(cls_name)
        if name in schemas:
            return
        cls = getattr(models, cls_name, None)
        if cls is None:
            schemas[name] = {"type": "object"}
            return
        schemas[name] = {}
        props: dict[str, Any] = {}
        required = []
        obj = cls.__new__(cls)
        obj.local_vars_configuration = Configuration()
        for attr, t in cls.openapi_types.items():
            json_name = cls.attribute_map[attr]
            s = type_schema(t)
            if t.startswith("list["):
                s.update(_list_extensions(cls_name, json_name))
            desc = _description(cls, attr)
            if desc:
                s["description"] = desc
            props[json_name] = s
            try:
                setattr(obj, attr, None)
            except ValueError:
                required.append(json_name)
        schema: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            schema["required"] = required
        schemas[name] = schema

    for res in resources.BUILTIN:
        ver = res.version.capitalize()
        candidates = [f"{ver}{res.kind}"]
        if res.kind == "Event":
            candidates = ["CoreV1Event"] if not res.group else ["EventsV1Event"]
        cls_name = next((c for c in candidates if hasattr(models, c)), None)
        if cls_name is None:
            continue
        name = f"io.k8s.api.{res.group or 'core'}.{res.version}.{res.kind}"
        _SPECIAL[cls_name] = name
        visit(cls_name)
        schemas[name]["x-kubernetes-group-version-kind"] = [{"group": res.group, "version": res.version,
                                                             "kind": res.kind}]
        kinds[f"{res.group}/{res.version}/{res.kind}"] = name
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"schemas": schemas, "kinds": kinds}, separators=(",", ":"), sort_keys=True))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(schemas)} schemas, {len(kinds)} kinds)")


if __name__ == "__main__":
    main()
