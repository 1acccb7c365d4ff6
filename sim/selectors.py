"""Label and field selectors, parsed from the query-string syntax the API server accepts."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any


class SelectorError(ValueError):
    """A selector the server cannot parse: answered with 400 BadRequest."""


@dataclasses.dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!":
            return self.key not in labels
        if self.op in ("=", "=="):
            return labels.get(self.key) == self.values[0]
        if self.op == "!=":
            return labels.get(self.key) != self.values[0]
        if self.op == "in":
            return labels.get(self.key) in self.values
        if self.op == "notin":
            return labels.get(self.key) not in self.values
        return False


_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:\s(in|notin)\s*\(([^)]*)\))?\s*$")


def _split(expr: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in expr:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def parse_labels(expr: str | None) -> list[Requirement]:
    """Parse ``a=b,c!=d,e in (f,g),!h,i``; raise SelectorError on anything else."""
    if not expr:
        return []
    reqs = []
    for raw in _split(expr):
        part = raw.strip()
        m = re.match(r"^([A-Za-z0-9_./-]+)\s*(==|!=|=)\s*([A-Za-z0-9_.-]*)$", part)
        if m:
            reqs.append(Requirement(m.group(1), "=" if m.group(2) == "==" else m.group(2), (m.group(3),)))
            continue
        m2 = _SET_RE.match(part)
        if not m2:
            raise SelectorError(f"unable to parse requirement: {part!r}")
        neg, key, op, vals = m2.groups()
        if op:
            if neg:
                raise SelectorError(f"unable to parse requirement: {part!r}")
            values = tuple(v.strip() for v in vals.split(",") if v.strip())
            reqs.append(Requirement(key, op, values))
        else:
            reqs.append(Requirement(key, "!" if neg else "exists"))
    return reqs


def match_labels(reqs: list[Requirement], labels: Mapping[str, str] | None) -> bool:
    lab = labels or {}
    return all(r.matches(lab) for r in reqs)


def from_label_selector(sel: Mapping[str, Any] | None) -> list[Requirement] | None:
    """Requirements of a metav1.LabelSelector; None means "matches nothing" (a nil selector on a workload)."""
    if sel is None:
        return None
    reqs = [Requirement(k, "=", (str(v),)) for k, v in (sel.get("matchLabels") or {}).items()]
    for expr in sel.get("matchExpressions") or []:
        op = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}.get(expr.get("operator", ""))
        if op is None:
            continue
        reqs.append(Requirement(expr.get("key", ""), op, tuple(expr.get("values") or ())))
    return reqs


def selector_string(sel: Mapping[str, Any] | None) -> str:
    """The canonical string form (as in Scale.status.selector)."""
    parts = [f"{k}={v}" for k, v in sorted((sel or {}).get("matchLabels", {}).items())]
    for expr in (sel or {}).get("matchExpressions") or []:
        op = expr.get("operator")
        if op == "Exists":
            parts.append(expr["key"])
        elif op == "DoesNotExist":
            parts.append("!" + expr["key"])
        else:
            parts.append(f"{expr['key']} {op.lower()} ({','.join(expr.get('values') or [])})")
    return ",".join(parts)


# Field selectors: the fields each kind supports, as a real server does (others are 400 BadRequest).
_COMMON_FIELDS = ("metadata.name", "metadata.namespace")
_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
            "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"),
    "Node": ("spec.unschedulable",),
    "Event": ("involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
              "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
              "reason", "reportingComponent", "source", "type"),
    "Secret": ("type",),
    "Service": ("spec.clusterIP", "spec.type"),  # since 1.31 (kube-proxy selects spec.clusterIP!=None)
    "Namespace": ("status.phase",),
    "ReplicaSet": ("status.replicas",),
    "Job": ("status.successful",),
}


@dataclasses.dataclass(frozen=True, slots=True)
class FieldReq:
    field: str
    value: str
    negate: bool


def parse_fields(expr: str | None, kind: str, *, custom: bool = False, selectable: tuple[str, ...] = ()
                 ) -> list[FieldReq]:
    """Parse ``a=b,c!=d``. Built-in kinds allow their own fields; a custom resource (whose kind may well be
    called ``Job`` or ``Service``) allows only its CRD version's ``selectableFields``."""
    if not expr:
        return []
    allowed = _COMMON_FIELDS + (selectable if custom else _KIND_FIELDS.get(kind, ()))
    out = []
    for raw in expr.split(","):
        part = raw.strip()
        if not part:
            continue
        m = re.match(r"^([A-Za-z.]+)\s*(==|!=|=)\s*(.*)$", part)
        if not m:
            raise SelectorError(f"invalid selector: {part!r}; can't understand {part!r}")
        field, op, value = m.groups()
        if field not in allowed:
            raise SelectorError(f'field label not supported: {field}')
        out.append(FieldReq(field, value, op == "!="))
    return out


def field_value(obj: Mapping[str, Any], field: str) -> str:
    cur: Any = obj
    if field == "source":
        return str(((obj.get("source") or {}).get("component")) or "")
    for part in field.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def match_fields(reqs: list[FieldReq], obj: Mapping[str, Any]) -> bool:
    for r in reqs:
        equal = field_value(obj, r.field) == r.value
        if equal == r.negate:
            return False
    return True


def matcher(labels: list[Requirement], fields: list[FieldReq]) -> Callable[[Mapping[str, Any]], bool]:
    def check(obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return match_labels(labels, meta.get("labels")) and match_fields(fields, obj)

    return check
