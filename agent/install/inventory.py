"""The inventory: which objects a bundle owns, kept in the cluster *and* in the agent's DB.

One ConfigMap per bundle, ``edgefleet-inventory-<name>-<release>`` in ``edgefleet-system``,
holding the object keys (``group/kind/namespace/name`` → component) as JSON, zstd-compressed
into ``binaryData`` when it would not fit comfortably (ConfigMaps cap at 1 MiB). The cluster
copy lets an operator (or a re-installed agent with an empty disk) see what edgefleet owns;
the local copy is what the engine reads, because it must work while the API is unreachable.

The target bundle's inventory is written *before* its first object is applied (state
``pending``), so after any crash the union "old inventory + new inventory" bounds every
object the agent could have created: that is what rollback and prune work from.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import zstandard

from agent import kube
from agent.install import model

COMPRESS_OVER = 256 * 1024
LABEL_INVENTORY = "edgefleet.io/inventory"


def name_for(*, bundle_name: str, release: int) -> str:
    return f"edgefleet-inventory-{bundle_name}-{release}"[:253]


def encode(refs: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(data, binaryData) for the ConfigMap."""
    raw = json.dumps(refs, sort_keys=True, separators=(",", ":"))
    if len(raw) <= COMPRESS_OVER:
        return {"objects.json": raw}, {}
    packed = zstandard.ZstdCompressor(level=10).compress(raw.encode())
    return {}, {"objects.json.zst": base64.b64encode(packed).decode()}


def decode(cm: dict[str, Any]) -> dict[str, str]:
    data = cm.get("data") or {}
    if "objects.json" in data:
        return dict(json.loads(data["objects.json"]))
    packed = (cm.get("binaryData") or {}).get("objects.json.zst")
    if packed:
        raw = zstandard.ZstdDecompressor().decompress(base64.b64decode(packed), max_output_size=64 * 1024 * 1024)
        return dict(json.loads(raw))
    return {}


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
    data, binary = encode(refs)
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
