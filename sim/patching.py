"""Patch formats: JSON merge (RFC 7386), JSON patch (RFC 6902) and the strategic-merge subset kubectl sends.

Strategic merge needs to know which lists merge by key. Built-in types carry that in Go struct tags; here a table
by field name covers the lists kubectl patches (containers, env, ports, volumes, tolerations are atomic ...).
Unknown lists are replaced whole, which is also what a real server does for custom resources.
"""

from __future__ import annotations

import copy
import json
from typing import Any

# Lists merged by key in strategic merge patch and server-side apply (field name -> key fields).
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "imagePullSecrets": ("name",),
    "conditions": ("type",),
    "hostAliases": ("ip",),
    "ownerReferences": ("uid",),
    "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
    "resourceClaims": ("name",),
    "schedulingGates": ("name",),
}
SET_LISTS = frozenset({"finalizers"})


def list_keys(field: str, items: list[Any]) -> tuple[str, ...] | None:
    """Merge keys of the list stored under ``field``, or None when the list is atomic."""
    if field == "ports":
        dicts = [i for i in items if isinstance(i, dict)]
        if dicts and all("containerPort" in i for i in dicts):
            return ("containerPort", "protocol")
        if dicts and all("port" in i for i in dicts):
            return ("port", "protocol")
        return None
    return MERGE_KEYS.get(field)


class PatchError(ValueError):
    """Malformed patch or a JSON-patch operation that cannot apply (answered 422 / 400)."""


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _item_key(item: Any, keys: tuple[str, ...]) -> tuple[Any, ...]:
    if not isinstance(item, dict):
        return (item,)
    defaults = {"protocol": "TCP"}
    return tuple(item.get(k, defaults.get(k)) for k in keys)


def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    if not isinstance(patch, dict):
        if isinstance(patch, list) and isinstance(target, list):
            keys = list_keys(field, patch + target)
            if keys:
                return _merge_keyed(target, patch, keys)
            if field in SET_LISTS:
                return target + [p for p in patch if p not in target]
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k.startswith("$setElementOrder/") or k in ("$retainKeys", "$patch"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            name = k.split("/", 1)[1]
            result[name] = [x for x in result.get(name) or [] if x not in v]
            continue
        if v is None:
            result.pop(k, None)
        else:
            result[k] = strategic_merge(result.get(k), v, k)
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_keyed(target: list[Any], patch: list[Any], keys: tuple[str, ...]) -> list[Any]:
    out = [copy.deepcopy(t) for t in target]
    for item in patch:
        if not isinstance(item, dict):
            continue
        key = _item_key(item, keys)
        idx = next((i for i, t in enumerate(out) if _item_key(t, keys) == key), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(strategic_merge({}, item))
        else:
            out[idx] = strategic_merge(out[idx], item)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    cur = doc
    for p in parts:
        if isinstance(cur, dict):
            if p not in cur:
                raise PatchError(f"path not found: /{'/'.join(parts)}")
            cur = cur[p]
        elif isinstance(cur, list):
            try:
                cur = cur[int(p)]
            except (ValueError, IndexError) as exc:
                raise PatchError(f"path not found: /{'/'.join(parts)}") from exc
        else:
            raise PatchError(f"path not found: /{'/'.join(parts)}")
    return cur


def json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise PatchError("json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op:
            raise PatchError("invalid json patch operation")
        kind = op["op"]
        parts = _pointer(op.get("path", ""))
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"missing value for {kind} operation")
        if kind == "test":
            if _walk(doc, parts) != op["value"]:
                raise PatchError(f"testing value {op.get('path')} failed")
            continue
        if kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = copy.deepcopy(_walk(doc, src))
            if kind == "move":
                doc = _remove(doc, src)
            doc = _add(doc, parts, value, replace=False)
            continue
        if kind == "remove":
            doc = _remove(doc, parts)
        elif kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op["value"]), replace=False)
        elif kind == "replace":
            _walk(doc, parts)
            doc = _add(doc, parts, copy.deepcopy(op["value"]), replace=True)
        else:
            raise PatchError(f"unexpected kind: {kind}")
    return doc


def _add(doc: Any, parts: list[str], value: Any, *, replace: bool) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            try:
                idx = int(last)
            except ValueError as exc:
                raise PatchError(f"invalid index {last!r}") from exc
            if replace:
                parent[idx] = value
            elif 0 <= idx <= len(parent):
                parent.insert(idx, value)
            else:
                raise PatchError(f"index out of range: {idx}")
    else:
        raise PatchError(f"cannot add at /{'/'.join(parts)}")
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise PatchError("cannot remove the root")
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    try:
        if isinstance(parent, dict):
            del parent[last]
        elif isinstance(parent, list):
            del parent[int(last)]
        else:
            raise PatchError(f"cannot remove /{'/'.join(parts)}")
    except (KeyError, ValueError, IndexError) as exc:
        raise PatchError(f"path not found: /{'/'.join(parts)}") from exc
    return doc


def apply_patch(content_type: str, target: dict[str, Any], body: bytes) -> dict[str, Any]:
    """Apply a non-SSA patch body of ``content_type`` to ``target`` (not modified)."""
    try:
        patch = json.loads(body or b"null")
    except ValueError as exc:
        raise PatchError(f"invalid JSON in patch: {exc}") from exc
    if content_type == "application/json-patch+json":
        result = json_patch(target, patch)
    elif content_type == "application/merge-patch+json":
        if not isinstance(patch, dict):
            raise PatchError("merge patch must be a JSON object")
        result = merge_patch(target, patch)
    elif content_type == "application/strategic-merge-patch+json":
        if not isinstance(patch, dict):
            raise PatchError("strategic merge patch must be a JSON object")
        result = strategic_merge(target, patch)
    else:
        raise PatchError(f"unsupported patch type {content_type!r}")
    if not isinstance(result, dict):
        raise PatchError("patch result is not an object")
    return result
