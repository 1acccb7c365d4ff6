"""Kubernetes objects from a staged bundle's YAML files.

Public surface (stable): ``load_objects(staged_dir, component) -> list[dict]``,
``parse_documents(text, *, source) -> list[dict]``, ``ContentError``.

``staged_dir`` is ``StagedBundle.path`` (the payload lives under ``payload/``); a payload dir
itself is accepted too. Objects come back in file order, then document order, which is the
apply order the bundle author chose (CRDs before their custom resources, namespaces first).

Parsing rules, matching what the API server and kubectl would see:
- multi-document YAML; empty documents (``---`` with nothing, comments only) are skipped;
- ``*List`` documents (``kind: ConfigMapList`` / ``List`` with ``items``) are expanded;
- the bare ``=`` scalar (in prometheus-operator's AlertmanagerConfig CRD) is the *string* "=": YAML
  1.1's ``tag:yaml.org,2002:value`` that PyYAML refuses to construct, while Go's YAML reads it
  as a string;
- a document that is not a mapping with ``apiVersion`` and ``kind`` is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bundles.manifest import Component

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ContentError(ValueError):
    """A payload file is not valid Kubernetes YAML."""


class _Loader(_Base):  # type: ignore[misc]
    pass


def _value_as_string(loader: Any, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))


_Loader.add_constructor("tag:yaml.org,2002:value", _value_as_string)


def parse_documents(text: str, *, source: str) -> list[dict[str, Any]]:
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        raise ContentError(f"{source}: YAML error: {' '.join(str(exc).split())}") from None
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
            raise ContentError(f"{source}: document {i} is not a Kubernetes object")
        kind = str(doc["kind"])
        if kind.endswith("List") and isinstance(doc.get("items"), list):
            for item in doc["items"]:
                if not isinstance(item, dict) or not item.get("apiVersion") or not item.get("kind"):
                    raise ContentError(f"{source}: an item of the {kind} in document {i} is not an object")
                out.append(item)
            continue
        out.append(doc)
    return out


def load_objects(staged_dir: Path | str, component: Component) -> list[dict[str, Any]]:
    base = Path(staged_dir)
    if (base / "payload").is_dir():
        base = base / "payload"
    objects: list[dict[str, Any]] = []
    for rel in component.files:
        path = base / rel
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ContentError(f"component {component.name}: cannot read {rel}: {exc}") from None
        objects.extend(parse_documents(text, source=f"{component.name}:{rel}"))
    return objects
