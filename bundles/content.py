"""Kubernetes objects from a staged bundle's YAML files.

Public surface (stable): ``load_objects(staged_dir, component) -> list[dict]``,
``iter_objects(staged_dir, component) -> Iterator[dict]`` (one document parsed at a time, for
readers that must not hold a whole component: a CRD-heavy one is megabytes of YAML and several
times that as dicts), ``parse_documents(text, *, source) -> list[dict]``, ``ContentError``.

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

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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
    return list(_objects(text, source=source))


def _objects(stream: str | IO[str], *, source: str) -> Iterator[dict[str, Any]]:
    """The objects of a multi-document YAML text or text stream, parsed one document at a time."""
    docs: Iterator[Any] = iter(yaml.load_all(stream, Loader=_Loader))
    i = -1
    while True:
        try:
            doc = next(docs)
        except StopIteration:
            return
        except yaml.YAMLError as exc:
            raise ContentError(f"{source}: YAML error: {' '.join(str(exc).split())}") from None
        i += 1
        if doc is None:
            continue
        if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
            raise ContentError(f"{source}: document {i} is not a Kubernetes object")
        kind = str(doc["kind"])
        if kind.endswith("List") and isinstance(doc.get("items"), list):
            for item in doc["items"]:
                if not isinstance(item, dict) or not item.get("apiVersion") or not item.get("kind"):
                    raise ContentError(f"{source}: an item of the {kind} in document {i} is not an object")
                yield item
            continue
        yield doc


def load_objects(staged_dir: Path | str, component: Component) -> list[dict[str, Any]]:
    return list(iter_objects(staged_dir, component))


def iter_objects(staged_dir: Path | str, component: Component) -> Iterator[dict[str, Any]]:
    base = Path(staged_dir)
    if (base / "payload").is_dir():
        base = base / "payload"
    for rel in component.files:
        try:
            with (base / rel).open(encoding="utf-8") as fh:
                yield from _objects(fh, source=f"{component.name}:{rel}")
        except (OSError, UnicodeDecodeError) as exc:
            raise ContentError(f"component {component.name}: cannot read {rel}: {exc}") from None
