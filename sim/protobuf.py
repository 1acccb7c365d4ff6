"""Decode the Kubernetes protobuf request bodies that kubectl's typed clients send.

client-go's typed clientsets send ``application/vnd.kubernetes.protobuf`` bodies (``kubectl create namespace``,
``kubectl drain``'s Eviction, ``kubectl create configmap|secret|serviceaccount``). Responses are always JSON
(kubectl accepts it), so only decoding is needed, and only for the small kinds those commands create. Other
kinds answer 415 UnsupportedMediaType, as a server without that serializer would.
"""

from __future__ import annotations

import base64
from typing import Any

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) triples; length-delimited values stay bytes."""
    out: list[tuple[int, int, Any]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
            out.append((num, wt, v))
        elif wt == 2:
            n, i = _varint(buf, i)
            out.append((num, wt, buf[i:i + n]))
            i += n
        elif wt == 1:
            out.append((num, wt, buf[i:i + 8]))
            i += 8
        elif wt == 5:
            out.append((num, wt, buf[i:i + 4]))
            i += 4
        else:
            raise ProtobufError(f"unsupported wire type {wt}")
    return out


def _map(entries: list[bytes], *, binary: bool = False) -> dict[str, str]:
    out = {}
    for e in entries:
        kv = {n: v for n, _, v in fields(e)}
        key = kv.get(1, b"").decode()
        val = kv.get(2, b"")
        out[key] = base64.b64encode(val).decode() if binary else val.decode()
    return out


def _meta(buf: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    labels: list[bytes] = []
    annotations: list[bytes] = []
    finalizers: list[str] = []
    for n, _, v in fields(buf):
        if n == 1:
            meta["name"] = v.decode()
        elif n == 2:
            meta["generateName"] = v.decode()
        elif n == 3:
            meta["namespace"] = v.decode()
        elif n == 5:
            meta["uid"] = v.decode()
        elif n == 6:
            meta["resourceVersion"] = v.decode()
        elif n == 11:
            labels.append(v)
        elif n == 12:
            annotations.append(v)
        elif n == 14:
            finalizers.append(v.decode())
    if labels:
        meta["labels"] = _map(labels)
    if annotations:
        meta["annotations"] = _map(annotations)
    if finalizers:
        meta["finalizers"] = finalizers
    return meta


def _strings(fs: list[tuple[int, int, Any]], num: int) -> list[str]:
    return [v.decode() for n, _, v in fs if n == num]


def _delete_options(buf: bytes) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for n, _, v in fields(buf):
        if n == 1:
            opts["gracePeriodSeconds"] = v - (1 << 64) if v >= 1 << 63 else v
        elif n == 2:
            pre = {m: w.decode() for m, _, w in fields(v)}
            opts["preconditions"] = {k: pre[i] for i, k in ((1, "uid"), (2, "resourceVersion")) if i in pre}
        elif n == 3:
            opts["orphanDependents"] = bool(v)
        elif n == 4:
            opts["propagationPolicy"] = v.decode()
        elif n == 5:
            opts.setdefault("dryRun", []).append(v.decode())
    return opts


def decode(body: bytes) -> dict[str, Any]:
    """Decode a ``k8s\\0``-framed runtime.Unknown into the JSON-shaped object."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing k8s protobuf magic")
    api_version = kind = ""
    raw = b""
    for n, _, v in fields(body[len(MAGIC):]):
        if n == 1:
            tm = {m: w.decode() for m, _, w in fields(v)}
            api_version, kind = tm.get(1, ""), tm.get(2, "")
        elif n == 2:
            raw = v
    if kind == "DeleteOptions":
        return {"apiVersion": api_version, "kind": kind, **_delete_options(raw)}
    fs = fields(raw)
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind}
    for n, _, v in fs:
        if n == 1:
            obj["metadata"] = _meta(v)
    if kind == "Namespace":
        spec = next((v for n, _, v in fs if n == 2), None)
        if spec is not None:
            fin = _strings(fields(spec), 1)
            obj["spec"] = {"finalizers": fin} if fin else {}
    elif kind == "Eviction":
        opts = next((v for n, _, v in fs if n == 2), None)
        if opts is not None:
            obj["deleteOptions"] = _delete_options(opts)
    elif kind == "ConfigMap":
        data = [v for n, _, v in fs if n == 2]
        binary = [v for n, _, v in fs if n == 3]
        if data:
            obj["data"] = _map(data)
        if binary:
            obj["binaryData"] = _map(binary, binary=True)
    elif kind == "Secret":
        data = [v for n, _, v in fs if n == 2]
        if data:
            obj["data"] = _map(data, binary=True)
        stype = _strings(fs, 3)
        if stype:
            obj["type"] = stype[0]
    elif kind == "ServiceAccount" or kind.endswith("Review"):
        pass  # reviews are answered without looking at their spec (the sim authorises everything)
    else:
        raise ProtobufError(f"protobuf bodies for {kind or 'this kind'} are not supported by the sim; send JSON")
    return obj
