"""The inventory: which objects a bundle owns, kept in the cluster *and* in the agent's DB.

One ConfigMap per bundle, ``edgefleet-inventory-<name>-<release>`` in ``edgefleet-system``,
holding the object keys (``group/kind/namespace/name`` → component) as JSON, zstd-compressed
into ``binaryData`` when it would not fit comfortably (ConfigMaps cap at 1 MiB). The cluster
copy lets an operator (or a re-installed agent with an empty disk) see what edgefleet owns;
the local copy is what the engine reads, because it must work while the API is unreachable.

Next to the keys, ``placement.json`` records what the install-time tier policy changed
(:mod:`agent.placement`): object key → change codes, only for objects it changed, and the
annotation ``edgefleet.io/placement`` counts them per tier (``tier2=5,tier3=2``). An inventory
written by an older agent has neither; it still decodes (no placement record).

The target bundle's inventory is written *before* its first object is applied (state
``pending``), so after any crash the union "old inventory + new inventory" bounds every
object the agent could have created: that is what rollback and prune work from.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

import zstandard

from agent import kube, placement
from agent.install import model

COMPRESS_OVER = 256 * 1024
LABEL_INVENTORY = "edgefleet.io/inventory"


def name_for(*, bundle_name: str, release: int) -> str:
    return f"edgefleet-inventory-{bundle_name}-{release}"[:253]


OBJECTS = "objects.json"
PLACEMENT = "placement.json"


def encode(
    refs: dict[str, str], placement_record: Mapping[str, Sequence[str]] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """(data, binaryData) for the ConfigMap; each document compressed on its own when large."""
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    docs: dict[str, object] = {OBJECTS: refs}
    if placement_record:
        docs[PLACEMENT] = {key: list(codes) for key, codes in placement_record.items()}
    for name, doc in docs.items():
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        if len(raw) <= COMPRESS_OVER:
            data[name] = raw
        else:
            packed = zstandard.ZstdCompressor(level=10).compress(raw.encode())
            binary[f"{name}.zst"] = base64.b64encode(packed).decode()
    return data, binary


def _document(cm: Mapping[str, Any], name: str) -> Any:
    """One JSON document of the ConfigMap (plain or zstd in binaryData), or None if absent."""
    data = cm.get("data") or {}
    if name in data:
        return json.loads(data[name])
    packed = (cm.get("binaryData") or {}).get(f"{name}.zst")
    if packed:
        raw = zstandard.ZstdDecompressor().decompress(base64.b64decode(packed), max_output_size=64 * 1024 * 1024)
        return json.loads(raw)
    return None


def decode(cm: Mapping[str, Any]) -> dict[str, str]:
    """Object key → component."""
    doc = _document(cm, OBJECTS)
    return dict(doc) if isinstance(doc, dict) else {}


def decode_placement(cm: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Object key → placement change codes; empty for an inventory written before they were recorded."""
    doc = _document(cm, PLACEMENT)
    if not isinstance(doc, dict):
        return {}
    return {str(key): placement.read_changes(codes) for key, codes in doc.items()}


def placement_of(spec: model.Spec, refs: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """The spec's placement record for the objects in ``refs`` (what this inventory lists)."""
    return {key: codes for unit in spec.units for key, codes in unit.placement.items() if key in refs}


def summary(spec: model.Spec, refs: Mapping[str, str]) -> str:
    """``tier2=5,tier3=2``: objects patched per tier (the annotation; ``none`` if nothing was)."""
    counts = placement.tier_counts(
        (unit.tier, codes) for unit in spec.units for key, codes in unit.placement.items() if key in refs
    )
    return ",".join(f"tier{tier}={c['objects']}" for tier, c in counts.items()) or "none"


async def ensure_namespace(api: Any) -> None:
    await kube.apply(
        api,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": model.SYSTEM_NAMESPACE, "labels": {"app.kubernetes.io/part-of": "edgefleet"}},
        },
    )


async def write(api: Any, spec: model.Spec, refs: dict[str, str], *, state: str) -> None:
    """Write (server-side apply) the bundle's inventory ConfigMap with ``state`` pending|committed."""
    await ensure_namespace(api)
    data, binary = encode(refs, placement_of(spec, refs))
    cm: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name_for(bundle_name=spec.name, release=spec.release),
            "namespace": model.SYSTEM_NAMESPACE,
            "labels": {"app.kubernetes.io/part-of": "edgefleet", LABEL_INVENTORY: spec.label},
            "annotations": {
                "edgefleet.io/bundle-id": spec.bundle_id,
                "edgefleet.io/state": state,
                "edgefleet.io/objects": str(len(refs)),
                "edgefleet.io/placement": summary(spec, refs),
            },
        },
        "data": data,
        "binaryData": binary,
    }
    await kube.apply(api, cm)


async def read(api: Any, *, bundle_name: str, release: int) -> dict[str, str] | None:
    cm = await kube.get(api, "v1", "ConfigMap", name_for(bundle_name=bundle_name, release=release),
                        namespace=model.SYSTEM_NAMESPACE)
    return None if cm is None else decode(cm)


async def remove(api: Any, *, bundle_name: str, release: int) -> None:
    await kube.delete(api, "v1", "ConfigMap", name_for(bundle_name=bundle_name, release=release),
                      namespace=model.SYSTEM_NAMESPACE)


async def keep_only(api: Any, keep: set[str]) -> None:
    """Delete inventory ConfigMaps other than ``keep`` (names): current + last good stay."""
    for cm in await kube.list_objects(api, "v1", "ConfigMap", namespace=model.SYSTEM_NAMESPACE,
                                      label_selector=LABEL_INVENTORY):
        name = str((cm.get("metadata") or {}).get("name", ""))
        if name not in keep:
            await kube.delete(api, "v1", "ConfigMap", name, namespace=model.SYSTEM_NAMESPACE)
