"""The installer's view of a bundle: components ready to apply, and object identities.

A :class:`Spec` is built once per run from a verified, staged bundle (see
:func:`agent.install.source.load_spec`), so everything below works on plain data and the rest
of the engine never touches bundle files.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from agent import jsonpick

MANAGED_BY = "edgefleet"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "edgefleet.io/component"
LABEL_LAYER = "edgefleet.io/layer"
LABEL_TIER = "edgefleet.io/tier"
LABEL_BUNDLE = "edgefleet.io/bundle"
LABEL_RETAINED = "edgefleet.io/retained-from"
ANNOTATION_ORIGINAL_REPLICAS = "edgefleet.io/original-replicas"
FIELD_MANAGER = "edgefleet"
SYSTEM_NAMESPACE = "edgefleet-system"

#: Kinds that carry pod templates (``spec.template``, or ``spec.jobTemplate.spec.template``).
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")
#: Kinds whose deletion destroys data beyond the object itself (see docs: prune rule).
DATA_BEARING = ("Namespace", "CustomResourceDefinition", "PersistentVolumeClaim", "PersistentVolume")


@dataclass(frozen=True, order=True)
class Ref:
    """An object's identity across versions: group, kind, namespace ('' if cluster-scoped), name."""

    group: str
    kind: str
    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.group}/{self.kind}/{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, key: str) -> Ref:
        group, kind, namespace, name = key.split("/", 3)
        return cls(group=group, kind=kind, namespace=namespace, name=name)

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Ref:
        api_version = str(obj.get("apiVersion", ""))
        group = api_version.rpartition("/")[0]
        meta = obj.get("metadata") or {}
        return cls(group=group, kind=str(obj.get("kind", "")), namespace=str(meta.get("namespace") or ""),
                   name=str(meta.get("name", "")))

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}"


def pack(objects: Iterable[Mapping[str, Any]]) -> bytes:
    """Objects as one compact JSON document per line, zstd-compressed.

    One document per line (JSON escapes newlines inside strings) lets a reader parse the objects
    one at a time (:meth:`Unit.documents`) instead of materialising a whole component.
    """
    return compress(b"\n".join(dump(obj) for obj in objects))


def compress(lines: bytes) -> bytes:
    """zstd level 3 with a 256 KiB window: a reader streaming the documents (:func:`iter_lines`)
    needs a window buffer that size, not the whole component's (level 3 alone picks up to 4 MiB,
    ~2.5 MB for the IDP's prometheus); the blobs grow from ~0.33 to ~0.6 MB for the platform."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=18)
    return zstandard.ZstdCompressor(compression_params=params).compress(lines)


def dump(obj: Mapping[str, Any]) -> bytes:
    """One object as the compact JSON line :func:`pack` stores."""
    return json.dumps(obj, separators=(",", ":")).encode()


def unpack_lines(blob: bytes | Path) -> list[bytes]:
    """The raw JSON documents of :func:`pack` (in memory or a file), unparsed (one bytes object each)."""
    return list(iter_lines(blob))


def iter_lines(blob: bytes | Path) -> Iterator[bytes]:
    """:func:`unpack_lines` one line at a time, decompressing as it goes: a reader after a few
    documents of a big component (drift) never holds the whole of it (prometheus: 2.5 MB).

    ``BufferedReader.readline`` joins a long line's chunks once; gluing them on by hand
    (``tail + chunk``) would copy a 700 KB CRD a dozen times over, growing the heap by megabytes.
    A file is read as it is decompressed (the generator closes it when done or discarded).
    """
    if isinstance(blob, Path):
        with blob.open("rb") as fh:
            yield from _lines(fh)
    elif blob:
        yield from _lines(blob)


def _lines(source: bytes | BinaryIO) -> Iterator[bytes]:
    with io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(source, closefd=False),
                           buffer_size=64 * 1024) as reader:
        # Each line but the last keeps its b"\n": still one JSON document, and not copied again
        # to drop it. pack([]) is an empty frame: no documents, not one empty one; an empty file
        # is no frame at all, and no documents either.
        yield from reader


#: How far a live object was seen: (resourceVersion, metadata.generation, 0 if its kind has none).
Seen = tuple[str, int]


def seen(obj: Mapping[str, Any]) -> Seen:
    """The :data:`Seen` of a live object (or of the server's answer to an apply)."""
    meta = obj.get("metadata") or {}
    generation = meta.get("generation")
    return str(meta.get("resourceVersion") or ""), generation if isinstance(generation, int) else 0


def stub(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What deleting or retaining an object needs (apiVersion, kind, name, namespace), not its body."""
    meta = obj.get("metadata") or {}
    small = {k: meta[k] for k in ("name", "namespace") if k in meta}
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": small}


@dataclass
class Unit:
    """One component of a bundle with its rendered objects (labels, namespace, tier policy applied).

    The rendered objects are kept zstd-compressed (``blob``) and parsed only while a step
    needs them: a full platform bundle is ~8 MB of JSON, ~40 MB as Python dicts, which an
    agent with a 64 MiB budget cannot hold for the current *and* the last good bundle. Even one
    component parsed at once is too much (the IDP's prometheus is 2.5 MB of JSON, ~8 MiB of
    dicts, and CPython keeps the heap fragmented after such a burst): the engine takes the raw
    documents (:meth:`documents`) and parses one object at a time.
    """

    name: str
    layer: int
    tier: int
    namespace: str
    depends_on: tuple[str, ...]
    gate_timeout: float
    #: Declared checks (see :mod:`agent.install.gates`).
    checks: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    #: The packed documents (:func:`pack`): in memory (a spec being rendered), or ``blob_path``,
    #: their file in the rendered cache, read each time a step needs them. Why not hold a loaded
    #: spec's blobs: ~0.6 MB per IDP bundle, twice during an upgrade (current and target), for
    #: an agent with a 64 MiB budget; a pass reads them again from the page cache in microseconds.
    blob: bytes = b""
    blob_path: Path | None = None
    #: Object keys in apply order, and (apiVersion, kind) pairs: known without unpacking.
    keys: list[str] = field(default_factory=list)
    kinds: set[tuple[str, str]] = field(default_factory=set)
    #: Health checks implied by the unit's own workloads/CRDs plus the declared ones.
    gate_checks: list[dict[str, Any]] = field(default_factory=list)
    #: Object key → install-time placement change codes (:data:`agent.placement.CHANGES`), only
    #: for objects the tier policy changed: the record the inventory carries, never the objects.
    placement: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def objects(self) -> list[dict[str, Any]]:
        """Every object, parsed (tests, tools; the engine uses :meth:`documents`)."""
        return [json.loads(line) for line in unpack_lines(self.packed_source())]

    def packed_source(self) -> bytes | Path:
        """Where the packed documents are: ``blob_path`` if set, else ``blob``."""
        return self.blob_path if self.blob_path is not None else self.blob

    def packed(self) -> bytes:
        """The packed documents as bytes (writing a cache)."""
        return self.blob_path.read_bytes() if self.blob_path is not None else self.blob

    def documents(self, keys: Iterable[str] | None = None, *,
                  order: Callable[[str], int] | None = None) -> Iterator[tuple[str, bytes]]:
        """(key, raw JSON) of the objects with these keys (all if None), unparsed, one at a time
        as they are decompressed: in stored order, or stably sorted by ``order(key)``, which takes
        a pass over the blob per distinct ``order`` value among them (zstd decompresses a big
        component in milliseconds; holding it whole would cost megabytes)."""
        wanted = set(self.keys) if keys is None else set(keys)
        if order is None:
            yield from ((key, line) for key, line in zip(self.keys, iter_lines(self.packed_source()), strict=True)
                        if key in wanted)
            return
        for rank in sorted({order(key) for key in self.keys if key in wanted}):
            yield from ((key, line) for key, line in zip(self.keys, iter_lines(self.packed_source()), strict=True)
                        if key in wanted and order(key) == rank)

    def set_objects(self, objects: list[dict[str, Any]]) -> None:
        self.blob, self.blob_path = pack(objects), None
        self.keys = [Ref.of(obj).key for obj in objects]
        self.kinds = {(str(obj.get("apiVersion")), str(obj.get("kind"))) for obj in objects}

    def set_documents(self, documents: list[tuple[str, tuple[str, str], bytes]]) -> None:
        """Like :meth:`set_objects`, from (key, (apiVersion, kind), compact JSON) already serialized."""
        self.blob, self.blob_path = compress(b"\n".join(doc for _, _, doc in documents)), None
        self.keys = [key for key, _, _ in documents]
        self.kinds = {kinds for _, kinds, _ in documents}

    def refs(self) -> dict[str, str]:
        return {key: self.name for key in self.keys}


@dataclass
class Spec:
    bundle_id: str
    name: str
    version: str
    release: int
    created: str
    path: str
    units: list[Unit]

    @property
    def label(self) -> str:
        return f"{self.name}-{self.version}"

    def unit(self, name: str) -> Unit:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise KeyError(name)

    def refs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for unit in self.units:
            out.update(unit.refs())
        return out

    def objects(self) -> dict[str, dict[str, Any]]:
        """Every object, parsed (transient use only: see :class:`Unit`)."""
        return {Ref.of(obj).key: obj for unit in self.units for obj in unit.objects}

    def heads(self, keys: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """(key, :data:`agent.jsonpick.HEAD` of the object) for these keys, without parsing bodies."""
        wanted = set(keys)
        for unit in self.units:
            if wanted.intersection(unit.keys):
                for key, line in unit.documents(wanted):
                    yield key, jsonpick.head(line)

    def stubs(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        """:func:`stub` of the objects with these keys (prune and rollback delete by identity)."""
        return [stub(head) for _, head in self.heads(keys)]

    def layers(self) -> list[list[Unit]]:
        """Units grouped by layer, 0 → 4, each layer in a stable (name) order."""
        return [sorted((u for u in self.units if u.layer == n), key=lambda u: u.name) for n in range(5)]
