"""Server-side apply and managedFields, a pragmatic subset of structured-merge-diff.

Field sets are sets of paths; a path is a tuple of fieldsV1 elements: ``f:name`` (map field), ``k:{...}``
(item of a list merged by key), ``v:<json>`` (item of a set-like list). Atomic lists and scalars are leaves.

What matches a real server: Apply entries per manager, conflicts only where another manager owns a field with a
*different* value (same value means shared ownership), ``force`` takes the conflicting fields over, fields a
manager stops applying are removed unless someone else owns them, non-apply writes become ``Update`` entries
owning what they changed, and the 409 Status names manager, apiVersion and field paths.
What is simplified: list semantics come from a field-name table (see ``patching.MERGE_KEYS``) instead of the
OpenAPI schema; label selectors are atomic; there is no type-aware defaulting of keys except ``protocol: TCP``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
from typing import Any

from sim import patching

Path = tuple[str, ...]
_MISSING = object()

# Paths a real server never records in managedFields.
_STRIP_META = frozenset({"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
                         "managedFields", "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds"})


def _key_json(item: dict[str, Any], keys: tuple[str, ...]) -> str:
    k = {}
    for name in keys:
        if name in item:
            k[name] = item[name]
        elif name == "protocol":
            k[name] = "TCP"
    return json.dumps(k, separators=(",", ":"), sort_keys=True)


def _atomic_map(field: str, value: dict[str, Any]) -> bool:
    return field == "selector" and ("matchLabels" in value or "matchExpressions" in value)


def _walk(value: Any, prefix: Path, field: str, out: set[Path]) -> None:
    if isinstance(value, dict) and value and not _atomic_map(field, value):
        for k, v in value.items():
            if v is None:
                continue
            _walk(v, (*prefix, "f:" + k), k, out)
        return
    if isinstance(value, list) and value:
        keys = patching.list_keys(field, value)
        if keys and all(isinstance(i, dict) for i in value):
            for item in value:
                kp = (*prefix, "k:" + _key_json(item, keys))
                out.add(kp)
                for k2, v2 in item.items():
                    if v2 is not None:
                        _walk(v2, (*kp, "f:" + k2), k2, out)
            return
        if field in patching.SET_LISTS:
            for item in value:
                out.add((*prefix, "v:" + json.dumps(item, separators=(",", ":"))))
            return
    if prefix:
        out.add(prefix)


def fieldset(obj: dict[str, Any], *, reset: tuple[str, ...] = ()) -> set[Path]:
    """Field set of an object, minus identity fields and the ``reset`` top-level fields (e.g. status)."""
    out: set[Path] = set()
    for k, v in obj.items():
        if k in ("apiVersion", "kind") or k in reset or v is None:
            continue
        if k == "metadata" and isinstance(v, dict):
            for mk, mv in v.items():
                if mk not in _STRIP_META and mv is not None:
                    _walk(mv, ("f:metadata", "f:" + mk), mk, out)
            continue
        _walk(v, ("f:" + k,), k, out)
    return out


def resolve(obj: Any, path: Path) -> Any:
    cur = obj
    for el in path:
        kind, rest = el[0], el[2:]
        if kind == "f":
            if not isinstance(cur, dict) or rest not in cur:
                return _MISSING
            cur = cur[rest]
        elif kind == "k":
            if not isinstance(cur, list):
                return _MISSING
            want = json.loads(rest)
            keys = tuple(want)
            cur = next((i for i in cur if isinstance(i, dict) and _key_json(i, keys) == _key_json(want, keys)),
                       _MISSING)
            if cur is _MISSING:
                return _MISSING
        elif kind == "v":
            val = json.loads(rest)
            if not isinstance(cur, list) or val not in cur:
                return _MISSING
            cur = val
        else:
            return _MISSING
    return cur


def remove(obj: dict[str, Any], path: Path) -> None:
    parent = resolve(obj, path[:-1])
    el = path[-1]
    kind, rest = el[0], el[2:]
    if kind == "f" and isinstance(parent, dict):
        parent.pop(rest, None)
    elif kind == "k" and isinstance(parent, list):
        want = json.loads(rest)
        keys = tuple(want)
        parent[:] = [i for i in parent if not (isinstance(i, dict) and _key_json(i, keys) == _key_json(want, keys))]
    elif kind == "v" and isinstance(parent, list):
        val = json.loads(rest)
        parent[:] = [i for i in parent if i != val]


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    members: set[Path] = set(paths)
    for p in paths:
        node = tree
        for el in p:
            node = node.setdefault(el, {})
    def finish(node: dict[str, Any], prefix: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if prefix in members and node:
            out["."] = {}
        for k in sorted(node):
            out[k] = finish(node[k], (*prefix, k))
        return out
    return finish(tree, ())


def from_fields_v1(tree: dict[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for k, child in tree.items():
        if k == ".":
            out.add(prefix)
            continue
        p = (*prefix, k)
        if child:
            out |= from_fields_v1(child, p)
        else:
            out.add(p)
    return out


def path_string(path: Path) -> str:
    """Human form used in conflict messages: ``.spec.template.spec.containers[name="app"].image``."""
    out = ""
    for el in path:
        kind, rest = el[0], el[2:]
        if kind == "f":
            out += "." + rest
        elif kind == "k":
            parts = ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(rest).items())
            out += f"[{parts}]"
        else:
            out += f"[={rest}]"
    return out


@dataclasses.dataclass(slots=True)
class Managed:
    manager: str
    operation: str
    api_version: str
    time: str
    subresource: str
    fields: set[Path]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read(obj: dict[str, Any] | None) -> list[Managed]:
    out = []
    for e in ((obj or {}).get("metadata") or {}).get("managedFields") or []:
        out.append(Managed(manager=e.get("manager", ""), operation=e.get("operation", "Update"),
                           api_version=e.get("apiVersion", ""), time=e.get("time", ""),
                           subresource=e.get("subresource", ""),
                           fields=from_fields_v1(e.get("fieldsV1") or {})))
    return out


def write(entries: list[Managed]) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        if not e.fields:
            continue
        doc: dict[str, Any] = {"manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                               "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(e.fields)}
        if e.subresource:
            doc["subresource"] = e.subresource
        out.append(doc)
    return out


@dataclasses.dataclass(slots=True)
class Conflict:
    manager: str
    api_version: str
    path: Path


class ConflictError(Exception):
    def __init__(self, conflicts: list[Conflict]) -> None:
        self.conflicts = conflicts
        super().__init__(message(conflicts))


def message(conflicts: list[Conflict]) -> str:
    if len(conflicts) == 1:
        c = conflicts[0]
        return (f"Apply failed with 1 conflict: conflict with {c.manager} using {c.api_version}: "
                f"{path_string(c.path)}")
    lines = [f"Apply failed with {len(conflicts)} conflicts:"]
    by: dict[tuple[str, str], list[str]] = {}
    for c in conflicts:
        by.setdefault((c.manager, c.api_version), []).append(path_string(c.path))
    for (mgr, ver), paths in by.items():
        lines.append(f"conflicts with {mgr} using {ver}:")
        lines.extend(f"- {p}" for p in sorted(paths))
    return "\n".join(lines)


def _merge(live: Any, applied: Any, field: str) -> Any:
    if isinstance(applied, dict) and isinstance(live, dict) and not _atomic_map(field, applied):
        out = dict(live)
        for k, v in applied.items():
            if v is None:
                continue
            out[k] = _merge(live.get(k), v, k)
        return out
    if isinstance(applied, list) and isinstance(live, list):
        keys = patching.list_keys(field, applied + live)
        if keys and all(isinstance(i, dict) for i in applied + live):
            out_list = list(live)
            for item in applied:
                kj = _key_json(item, keys)
                idx = next((i for i, x in enumerate(out_list) if _key_json(x, keys) == kj), None)
                if idx is None:
                    out_list.append(_strip_nulls(item))
                else:
                    out_list[idx] = _merge(out_list[idx], item, "")
            return out_list
        if field in patching.SET_LISTS:
            return list(live) + [copy.deepcopy(i) for i in applied if i not in live]
    return _strip_nulls(applied)


def _strip_nulls(value: Any) -> Any:
    """A copy of ``value`` without null fields (null in an applied config means "not set")."""
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def apply(
    live: dict[str, Any] | None,
    applied: dict[str, Any],
    *,
    manager: str,
    force: bool,
    api_version: str,
    subresource: str = "",
    reset: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Merge ``applied`` into ``live`` as ``manager``; returns the new object with updated managedFields.

    ``reset`` names top-level fields this endpoint ignores (``status`` on the main resource of a kind with a
    status subresource, everything but ``status`` on /status). Raises ConflictError.
    """
    base = live or {}
    entries = read(live)
    applied = {k: v for k, v in applied.items() if k not in reset}
    new_set = fieldset(applied, reset=reset)
    conflicts: list[Conflict] = []
    for e in entries:
        if e.manager == manager and e.operation == "Apply" and e.subresource == subresource:
            continue
        who = f'"{e.manager}" with subresource "{e.subresource}"' if e.subresource else f'"{e.manager}"'
        for p in new_set & e.fields:
            if p[-1][0] in "kv":
                continue
            if resolve(base, p) != resolve(applied, p):
                conflicts.append(Conflict(who, e.api_version, p))
    if conflicts and not force:
        raise ConflictError(conflicts)
    lost = {c.path for c in conflicts}  # force: the other managers lose these fields
    mine = next((e for e in entries if e.manager == manager and e.operation == "Apply"
                 and e.subresource == subresource), None)
    old_set = mine.fields if mine else set()
    others: set[Path] = set()
    for e in entries:
        if e is not mine:
            e.fields -= lost
            others |= e.fields
    merged = _merge(json.loads(json.dumps(base)) if base else {}, applied, "")
    prefixes = {q[:i] for q in new_set | others for i in range(1, len(q))}
    for p in sorted(old_set - new_set - others, key=len, reverse=True):
        if p not in prefixes:
            remove(merged, p)
    if mine is None:
        mine = Managed(manager, "Apply", api_version, _now(), subresource, set())
        entries.append(mine)
    mine.fields = new_set
    mine.time = _now()
    mine.api_version = api_version
    merged.setdefault("metadata", {})["managedFields"] = write(entries)
    result: dict[str, Any] = merged
    return result


def track_update(
    old: dict[str, Any] | None,
    new: dict[str, Any],
    *,
    manager: str,
    api_version: str,
    subresource: str = "",
    reset: tuple[str, ...] = (),
) -> None:
    """Record a non-apply write: ``manager`` takes over the fields it changed (in place on ``new``)."""
    entries = read(old)
    old_set = fieldset(old, reset=reset) if old else set()
    new_set = fieldset(new, reset=reset)
    changed = {p for p in new_set if p not in old_set or resolve(old, p) != resolve(new, p)}
    removed = old_set - new_set
    mine = None
    for e in entries:
        e.fields -= removed
        if e.manager == manager and e.operation == "Update" and e.subresource == subresource:
            mine = e
        else:
            e.fields -= changed
    if changed:
        if mine is None:
            mine = Managed(manager, "Update", api_version, _now(), subresource, set())
            entries.append(mine)
        mine.fields |= changed
        mine.time = _now()
    new.setdefault("metadata", {})["managedFields"] = write(entries)
