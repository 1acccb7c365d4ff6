"""Object validation that a real API server applies before storing, with its exact messages.

Only the checks that matter for fidelity are modelled: metadata names (per kind, as the Go validators do),
labels and annotations size, CRD naming, and a few required fields of workloads. Schema validation of CR
bodies is not performed (see docs/sim.md).
"""

from __future__ import annotations

import json
import re
from typing import Any

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

MSG_SUBDOMAIN = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                 "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                 "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
MSG_LABEL1123 = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                 "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                 "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
MSG_LABEL1035 = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                 "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
                 "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")

_LABEL_KINDS = {"Namespace"}
_DNS1035_KINDS = {"Service"}
_PATH_SEGMENT_KINDS = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


def _q(value: str) -> str:
    return json.dumps(value)


def name_errors(kind: str, name: str) -> list[str]:
    """Error messages for ``name`` as the Go name validator of ``kind`` reports them."""
    if kind in _PATH_SEGMENT_KINDS:
        if name in (".", ".."):
            return [f"may not be '{name}'"]
        for bad in ("/", "%"):
            if bad in name:
                return [f"may not contain '{bad}'"]
        return []
    if kind in _DNS1035_KINDS:
        errs = []
        if len(name) > 63:
            errs.append("must be no more than 63 characters")
        if not _LABEL1035.match(name):
            errs.append(MSG_LABEL1035)
        return errs
    if kind in _LABEL_KINDS:
        errs = []
        if len(name) > 63:
            errs.append("must be no more than 63 characters")
        if not _LABEL1123.match(name):
            errs.append(MSG_LABEL1123)
        return errs
    errs = []
    if len(name) > 253:
        errs.append("must be no more than 253 characters")
    if not _SUBDOMAIN.match(name):
        errs.append(MSG_SUBDOMAIN)
    return errs


def _invalid(field: str, value: Any, msg: str) -> dict[str, str]:
    shown = _q(value) if isinstance(value, str) else json.dumps(value)
    return {"reason": "FieldValueInvalid", "message": f"Invalid value: {shown}: {msg}", "field": field}


def _required(field: str) -> dict[str, str]:
    return {"reason": "FieldValueRequired", "message": "Required value", "field": field}


def _label_key_errors(key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    errs = []
    if prefix and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix)):
        errs.append("prefix part " + MSG_SUBDOMAIN)
    if not name or len(name) > 63 or not _QUALIFIED.match(name):
        errs.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                    "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")
    return errs


def validate(kind: str, obj: dict[str, Any], *, plural: str = "", group: str = "") -> list[dict[str, str]]:
    """Causes (empty when valid) for a create or update of ``obj``."""
    causes: list[dict[str, str]] = []
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    if not name:
        causes.append({"reason": "FieldValueRequired", "message": "Required value: name or generateName is required",
                       "field": "metadata.name"})
    else:
        causes.extend(_invalid("metadata.name", name, m) for m in name_errors(kind, name))
    for key, value in (meta.get("labels") or {}).items():
        causes.extend(_invalid("metadata.labels", key, m) for m in _label_key_errors(key))
        if not isinstance(value, str) or len(value) > 63 or (value and not _QUALIFIED.match(value)):
            causes.append(_invalid("metadata.labels", value,
                                   "a valid label must be an empty string or consist of alphanumeric characters, "
                                   "'-', '_' or '.', and must start and end with an alphanumeric character"))
    annotations = meta.get("annotations") or {}
    total = sum(len(k) + len(v if isinstance(v, str) else "") for k, v in annotations.items())
    if total > 256 * 1024:
        causes.append({"reason": "FieldValueTooLong",
                       "message": "Too long: must have at most 262144 bytes", "field": "metadata.annotations"})
    if kind == "CustomResourceDefinition" and name:
        spec = obj.get("spec") or {}
        want = f"{(spec.get('names') or {}).get('plural', '')}.{spec.get('group', '')}"
        if name != want:
            causes.append(_invalid("metadata.name", name, "must be spec.names.plural+\".\"+spec.group"))
        if not spec.get("versions"):
            causes.append(_required("spec.versions"))
    if kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
        spec = obj.get("spec") or {}
        if spec.get("selector") is None:
            causes.append(_required("spec.selector"))
        else:
            tmpl_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            wanted = (spec.get("selector") or {}).get("matchLabels") or {}
            if any(tmpl_labels.get(k) != v for k, v in wanted.items()):
                causes.append(_invalid("spec.template.metadata.labels", tmpl_labels,
                                       "`selector` does not match template `labels`"))
        if not ((spec.get("template") or {}).get("spec") or {}).get("containers"):
            causes.append(_required("spec.template.spec.containers"))
    if kind == "Pod":
        spec = obj.get("spec") or {}
        if not spec.get("containers"):
            causes.append(_required("spec.containers"))
        for field in ("hostname", "subdomain"):
            value = spec.get(field)
            if value and (len(value) > 63 or not _LABEL1123.match(value)):
                causes.append(_invalid(f"spec.{field}", value, MSG_LABEL1123))
    return causes
