"""Putting objects into the cluster and taking them out, with the retry rules of the engine.

* Server-side apply, field manager ``edgefleet``, ``force=true``: the bundle is the source of
  truth for every field it sets; fields other managers own (the degradation controller's
  replica count, controllers' status) are left alone.
* Within a component: Namespaces and CRDs first, then CRDs must be Established before the
  rest (their custom resources among it); the rest goes out concurrently (it has no order the
  API server enforces), webhooks and APIServices last so they do not intercept our own writes.
* An unreachable API server is waited out (backoff, no deadline): failing the run would start
  a rollback that cannot reach the cluster either. A kind the server does not know yet is
  retried until the component's deadline (a CRD from an earlier step may still be settling).
  Any other refusal (422 Invalid, 403, ...) fails the component at once: retrying cannot fix it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import structlog

from agent import jsonpick, kube
from agent.install import gates, journal, model, render

log = structlog.get_logger("edgefleet.install")

T = TypeVar("T")
OBJECT_CONCURRENCY = 8
MAX_BACKOFF = 10.0
PROTECTED_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease", model.SYSTEM_NAMESPACE})
_LATE_KINDS = ("APIService", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
#: Kinds applied with the live ``spec.replicas`` while the degradation controller has scaled them.
_LIVE_REPLICAS = ("Deployment", "StatefulSet", "ReplicaSet")


_END = object()


class ApplyFailed(Exception):
    """An object was refused for good; the message names it."""


async def retrying(call: Callable[[], Awaitable[T]], *, what: str, deadline: float) -> T:
    delay = 0.2
    while True:
        try:
            return await call()
        except kube.KubeUnavailable as exc:
            log.warning("API server unavailable, retrying", what=what, error=str(exc))
        except kube.UnknownKind as exc:
            # Discovery is re-fetched by kube.resource_for on a miss, so just try again.
            if time.monotonic() >= deadline:
                raise ApplyFailed(f"{what}: {exc}") from None
        except kube.KubeError as exc:
            raise ApplyFailed(f"{what}: {exc}") from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)


async def apply_object(api: Any, obj: dict[str, Any], *, deadline: float) -> dict[str, Any]:
    """Apply one rendered object, keeping a degraded workload's live replica count.

    Returns the ``metadata`` of the server's answer only (``{"metadata": ...}``): callers want
    its resourceVersion, and the answer repeats the whole object (a big CRD: ~3 MiB as dicts).
    """
    ref = model.Ref.of(obj)
    meta = obj.get("metadata") or {}
    if obj.get("kind") in _LIVE_REPLICAS:
        live = await retrying(
            lambda: kube.get(api, str(obj["apiVersion"]), str(obj["kind"]), str(meta["name"]),
                             namespace=meta.get("namespace")),
            what=str(ref), deadline=deadline,
        )
        obj = render.keep_live_replicas(obj, live)
    return await retrying(lambda: kube.apply(api, obj, fields=("metadata",)), what=str(ref), deadline=deadline)


async def apply_document(api: Any, document: bytes, *, deadline: float) -> tuple[dict[str, Any], model.Seen]:
    """:func:`apply_object` for a rendered document as stored (raw JSON): sent as it is, unparsed,
    unless it is a workload whose live replica count must be kept (small objects).

    Returns the document's :data:`agent.jsonpick.HEAD` (what the caller needs to know of it) and
    the resourceVersion and generation the server answered with.
    """
    head = jsonpick.head(document)
    if head.get("kind") in _LIVE_REPLICAS:
        answer = await apply_object(api, json.loads(document), deadline=deadline)
    else:
        answer = await retrying(lambda: kube.apply(api, head, body=document, fields=("metadata",)),
                                what=str(model.Ref.of(head)), deadline=deadline)
    return head, model.seen(answer)


async def gather_bounded(items: Iterable[T], fn: Callable[[T], Awaitable[Any]], *, limit: int) -> None:
    """``fn`` over ``items``, at most ``limit`` at once; the first failure cancels the rest.

    The next item is taken only once a slot is free, so a lazy ``items`` (documents streaming
    out of a component's compressed blob) never has more than ``limit`` of them in memory.
    """
    sem = asyncio.Semaphore(limit)

    async def one(item: T) -> None:
        try:
            await fn(item)
        finally:
            sem.release()

    pending = iter(items)
    async with asyncio.TaskGroup() as group:
        while True:
            await sem.acquire()  # before taking the item: a waiting item is in memory too
            item = next(pending, _END)
            if item is _END:
                sem.release()
                break
            group.create_task(one(item))  # type: ignore[arg-type]


async def apply_unit(api: Any, unit: model.Unit, *, deadline: float, step: str,
                     versions: dict[str, model.Seen] | None = None) -> int:
    """Apply a component's objects in the order described in the module docstring.

    ``versions`` gets key → (resourceVersion, generation) of each object as applied: the live object holds
    what the bundle sets at that version (drift need not read it again, see drift.save_verified).

    Objects stay raw JSON and go out as such (:func:`apply_document`); only their names are
    parsed, and the server's answer only for its metadata, so a component's big CRDs never exist
    as dicts in the agent (see :class:`model.Unit` for why that matters to its memory).
    """
    kind_of = {key: model.Ref.parse(key).kind for key in unit.keys}
    early = ("Namespace", "CustomResourceDefinition")

    def docs(select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        return unit.documents([k for k in unit.keys if select(kind_of[k])], order=render.key_order)

    count = 0
    crd_checks: list[dict[str, Any]] = []
    crd_groups: set[str] = set()

    async def one(doc: tuple[str, bytes]) -> None:
        nonlocal count
        head, version = await apply_document(api, doc[1], deadline=deadline)
        if versions is not None:
            versions[doc[0]] = version
        if head.get("kind") == "CustomResourceDefinition":
            crd_checks.extend(gates.implied_checks([head]))
            # A CRD's name is <plural>.<group> (the API server enforces it): no need for its spec.
            crd_groups.add(str((head.get("metadata") or {}).get("name", "")).partition(".")[2])
        count += 1
        journal.failpoint(f"{step}#{count}")

    for doc in docs(lambda kind: kind in early):  # few, and namespaces must exist before anything lands in them
        await one(doc)
    if crd_checks:
        try:
            await gates.wait(api, crd_checks, timeout=max(1.0, deadline - time.monotonic()))
        except gates.GateFailed as exc:
            raise ApplyFailed(f"CRDs of {unit.name} not Established: {exc}") from None
        for group in crd_groups:
            kube.forget(api, group=group)
    try:
        await gather_bounded(docs(lambda kind: kind not in early and kind not in _LATE_KINDS), one,
                             limit=OBJECT_CONCURRENCY)
        await gather_bounded(docs(lambda kind: kind in _LATE_KINDS), one, limit=OBJECT_CONCURRENCY)
    except* ApplyFailed as group:
        raise group.exceptions[0] from None
    return count


def delete_order(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reverse apply order: custom resources and workloads before CRDs and Namespaces."""
    return sorted(objects, key=render.order_key, reverse=True)


async def delete_object(api: Any, obj: dict[str, Any]) -> bool:
    meta = obj.get("metadata") or {}
    ref = model.Ref.of(obj)
    if obj.get("kind") == "Namespace" and meta.get("name") in PROTECTED_NAMESPACES:
        return False
    try:
        return await retrying(
            lambda: kube.delete(api, str(obj["apiVersion"]), str(obj["kind"]), str(meta["name"]),
                                namespace=meta.get("namespace")),
            what=f"delete {ref}", deadline=time.monotonic(),
        )
    except ApplyFailed as exc:
        if "does not serve" in str(exc):  # its CRD is gone: so is the object
            return False
        raise


async def retain_object(api: Any, obj: dict[str, Any], *, bundle_label: str) -> None:
    """Hand a data-bearing object (Namespace, CRD) over to the operator instead of deleting it.

    A merge patch (not an apply) drops our labels, so a later apply by us would not remove
    fields; the object keeps working and is found with ``-l edgefleet.io/retained-from``.
    """
    meta = obj.get("metadata") or {}
    body = {
        "metadata": {
            "labels": {
                model.LABEL_MANAGED_BY: None,
                model.LABEL_BUNDLE: None,
                model.LABEL_COMPONENT: None,
                model.LABEL_LAYER: None,
                model.LABEL_TIER: None,
                model.LABEL_RETAINED: bundle_label,
            }
        }
    }

    async def call() -> dict[str, Any] | None:
        try:
            return await kube.patch(api, str(obj["apiVersion"]), str(obj["kind"]), str(meta["name"]), body,
                                    namespace=meta.get("namespace"), field_manager="edgefleet-prune",
                                    fields=("metadata",))
        except kube.NotFound:
            return None

    await retrying(call, what=f"retain {model.Ref.of(obj)}", deadline=time.monotonic())


async def exists(api: Any, obj: dict[str, Any]) -> bool:
    meta = obj.get("metadata") or {}

    async def call() -> bool:
        try:
            live = await kube.get(api, str(obj["apiVersion"]), str(obj["kind"]), str(meta["name"]),
                                  namespace=meta.get("namespace"), fields=("metadata",))
        except kube.UnknownKind:
            return False
        return live is not None

    return await retrying(call, what=f"get {model.Ref.of(obj)}", deadline=time.monotonic() + 30)
