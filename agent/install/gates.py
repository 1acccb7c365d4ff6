"""Health gates: a component is installed only once its workloads are healthy.

Checks come from two places: every workload/CRD the component applies gets an implied check
(Deployments Available, StatefulSets and DaemonSets ready, CRDs Established, Jobs complete),
and the bundle may declare more (``healthChecks``: the same types on other objects, or a
``condition`` on any object). A component's gate passes when all its checks pass, and fails
when its timeout runs out first (the largest declared ``timeoutSeconds``, else the config's
default), or at once when a Job reports ``Failed`` (waiting cannot fix that).

Checks read ``status`` fields only and compare ``observedGeneration`` where the API has it,
so a gate never passes on the status of the *previous* spec.

A workload whose pods cannot get their image fails at once, naming the pod and the image, instead of
running into the timeout: while a Deployment/StatefulSet/DaemonSet/Job check fails, its Pending pods
are listed (one LIST per namespace+selector, at most every ``PODS_EVERY`` seconds, and only while
the check fails), and a container waiting with ``ImagePullBackOff``, ``InvalidImageName`` or
``ErrImageNeverPull``, or with ``ErrImagePull`` (and its CRI variants) for longer than
``PULL_GRACE`` (a registry blip may heal), is a terminal failure. Waiting for the kubelet's next
retry (10 s doubling to 5 min) cannot beat the rollback to a bundle whose images the site has.

A workload scaled down by the degradation controller (``edgefleet.io/original-replicas``)
counts as healthy at its current scale: degradation is a decision, not an install failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from agent.install import model

IMPLIED = {
    "Deployment": "deployment-available",
    "StatefulSet": "statefulset-ready",
    "DaemonSet": "daemonset-ready",
    "CustomResourceDefinition": "crd-established",
    "Job": "job-complete",
}
_KIND_OF = {v: k for k, v in IMPLIED.items()}
_API_OF = {
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1",
    "CustomResourceDefinition": "apiextensions.k8s.io/v1",
    "Job": "batch/v1",
}
POLL_SECONDS = 0.5
PODS_EVERY = 2.0
PULL_GRACE = 10.0
#: Waiting reasons of a container whose image the kubelet cannot get: terminal at once ...
PULL_TERMINAL = ("ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
#: ... and after PULL_GRACE (the kubelet's first failure; the next sync shows ImagePullBackOff).
PULL_TRANSIENT = ("ErrImagePull", "RegistryUnavailable", "SignatureValidationFailed")
_POD_CHECKS = ("deployment-available", "statefulset-ready", "daemonset-ready", "job-complete")


class GateFailed(Exception):
    """The gate cannot pass (timeout, or a terminal failure like a failed Job)."""


def implied_checks(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for obj in objects:
        check_type = IMPLIED.get(str(obj.get("kind", "")))
        if check_type is None:
            continue
        meta = obj.get("metadata") or {}
        checks.append(
            {
                "type": check_type,
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace") or None,
            }
        )
    return checks


def normalise(check: Mapping[str, Any], *, namespace: str) -> dict[str, Any]:
    """A declared check as a dict with apiVersion/kind/name/namespace filled in."""
    check_type = str(check["type"])
    kind = check.get("kind") or _KIND_OF.get(check_type, "")
    out = {
        "type": check_type,
        "apiVersion": check.get("apiVersion") or _API_OF.get(str(kind), "v1"),
        "kind": kind,
        "name": check["name"],
        "namespace": None if kind == "CustomResourceDefinition" else (check.get("namespace") or namespace),
    }
    if check_type == "condition":
        out["condition"] = check.get("condition")
        out["status"] = check.get("status", "True")
    return out


def _condition(obj: Mapping[str, Any], name: str) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == name:
            return str(cond.get("status"))
    return None


def _observed(obj: Mapping[str, Any]) -> bool:
    generation = (obj.get("metadata") or {}).get("generation")
    observed = (obj.get("status") or {}).get("observedGeneration")
    return generation is None or (observed is not None and int(observed) >= int(generation))


def describe(check: Mapping[str, Any]) -> str:
    namespace = check.get("namespace")
    return f"{check['kind']} {namespace + '/' if namespace else ''}{check['name']}"


def evaluate(check: Mapping[str, Any], obj: Mapping[str, Any] | None) -> tuple[bool, str]:
    """(passed, why not). Raises :class:`GateFailed` for a terminal failure."""
    what = describe(check)
    if obj is None:
        return False, f"{what} does not exist"
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    check_type = check["type"]
    if check_type == "crd-established":
        ok = _condition(obj, "Established") == "True"
        return ok, "" if ok else f"{what} not Established"
    if check_type == "job-complete":
        if _condition(obj, "Failed") == "True":
            raise GateFailed(f"{what} failed")
        ok = _condition(obj, "Complete") == "True"
        return ok, "" if ok else f"{what} not complete"
    if check_type == "condition":
        want = str(check.get("status", "True"))
        got = _condition(obj, str(check.get("condition")))
        ok = got == want
        return ok, "" if ok else f"{what} condition {check.get('condition')} is {got}, want {want}"
    if not _observed(obj):
        return False, f"{what} status not observed yet"
    replicas = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
    if check_type == "deployment-available":
        if replicas == 0:
            return True, ""
        ok = _condition(obj, "Available") == "True" and int(status.get("updatedReplicas") or 0) >= replicas
        ok = ok and int(status.get("availableReplicas") or 0) >= replicas
        return ok, "" if ok else f"{what} available {status.get('availableReplicas') or 0}/{replicas}"
    if check_type == "statefulset-ready":
        ready = int(status.get("readyReplicas") or 0)
        ok = ready >= replicas
        return ok, "" if ok else f"{what} ready {ready}/{replicas}"
    if check_type == "daemonset-ready":
        desired = int(status.get("desiredNumberScheduled") or 0)
        ready = int(status.get("numberReady") or 0)
        ok = ready >= desired and int(status.get("updatedNumberScheduled", desired) or 0) >= desired
        return ok, "" if ok else f"{what} ready {ready}/{desired}"
    return False, f"unknown check type {check_type}"


def selector_string(selector: Mapping[str, Any]) -> str:
    """A LabelSelector as a ``labelSelector`` query (``matchLabels`` and ``matchExpressions``)."""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), ",".join(expr.get("values") or [])
        parts.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": str(key),
                      "DoesNotExist": f"!{key}"}.get(str(op), ""))
    return ",".join(p for p in parts if p)


def _pod_selector(check: Mapping[str, Any], obj: Mapping[str, Any]) -> str:
    selector = (obj.get("spec") or {}).get("selector")
    if isinstance(selector, Mapping) and (selector.get("matchLabels") or selector.get("matchExpressions")):
        return selector_string(selector)
    return f"job-name={check['name']}" if check["kind"] == "Job" else ""


def image_problem(
    pods: list[dict[str, Any]], *, seen: dict[tuple[str, str], float] | None = None, now: float = 0.0
) -> str | None:
    """The first container of ``pods`` that cannot get its image, as ``pod ns/name: container c cannot get
    image "x": Reason: kubelet message``; None when there is none (yet).

    With ``seen`` (first-seen times, kept by the caller across polls) a transient reason counts only after
    ``PULL_GRACE``; without it every image-pull reason counts (supervision reports what is, now).
    """
    current: set[tuple[str, str]] = set()
    found = None
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        images = {c.get("name"): c.get("image") for c in [*((pod.get("spec") or {}).get("initContainers") or []),
                                                          *((pod.get("spec") or {}).get("containers") or [])]}
        status = pod.get("status") or {}
        for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = str(waiting.get("reason") or "")
            if reason not in PULL_TERMINAL and reason not in PULL_TRANSIENT:
                continue
            key = (str(meta.get("uid") or meta.get("name")), str(cs.get("name")))
            current.add(key)
            if seen is not None and reason in PULL_TRANSIENT and now - seen.setdefault(key, now) < PULL_GRACE:
                continue
            if found is None:
                message = " ".join(str(waiting.get("message") or "").split())
                message = message if len(message) <= 600 else message[:597] + "..."
                found = (f"pod {meta.get('namespace')}/{meta.get('name')}: container {cs.get('name')} cannot get "
                         f"image \"{cs.get('image') or images.get(cs.get('name'))}\": {reason}"
                         + (f": {message}" if message else ""))
    if seen is not None:
        for key in [k for k in seen if k not in current]:
            del seen[key]  # the container got past it: a later failure starts a new grace
    return found


async def pods_of(api: Any, check: Mapping[str, Any], obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The workload's Pending pods (one LIST; pods waiting for an image are Pending)."""
    from agent import kube

    selector = _pod_selector(check, obj)
    if not selector or check["type"] not in _POD_CHECKS:
        return []
    namespace = (obj.get("metadata") or {}).get("namespace") or check.get("namespace")
    return await kube.list_objects(api, "v1", "Pod", namespace=namespace, label_selector=selector,
                                   field_selector="status.phase=Pending")


async def _fetch(api: Any, check: Mapping[str, Any]) -> dict[str, Any] | None:
    # agent.kube (kubernetes-asyncio, aiohttp: ~20 MiB) is imported where the API is used, so
    # the one-shot renderer (agent.install.cache), which needs only the check builders, stays small.
    from agent import kube

    # A CRD's Established condition needs its status only; its spec (the schema) can be ~700 KB.
    fields = ("status",) if check["type"] == "crd-established" else None
    try:
        return await kube.get(api, str(check["apiVersion"]), str(check["kind"]), str(check["name"]),
                              namespace=check.get("namespace"), fields=fields)
    except kube.UnknownKind:
        return None


async def probe(api: Any, check: Mapping[str, Any]) -> tuple[bool, str]:
    return evaluate(check, await _fetch(api, check))


async def wait(api: Any, checks: list[dict[str, Any]], *, timeout: float) -> None:
    """Return when every check passes; raise :class:`GateFailed` on timeout or terminal failure
    (a failed Job, a container that cannot get its image).

    An unreachable API server does not fail the gate by itself; only the timeout does, so a
    short API blip during a long install is not a rollback.
    """
    from agent import kube

    pending = list(checks)
    deadline = time.monotonic() + timeout
    last = ""
    seen: dict[int, dict[tuple[str, str], float]] = {}  # check → (pod, container) → first seen failing to pull
    listed: dict[int, float] = {}  # check → when its pods were last listed
    while True:
        still: list[dict[str, Any]] = []
        for check in pending:
            try:
                obj = await _fetch(api, check)
                ok, why = evaluate(check, obj)
                if not ok and obj is not None and time.monotonic() - listed.get(id(check), 0.0) >= PODS_EVERY:
                    listed[id(check)] = time.monotonic()
                    problem = image_problem(await pods_of(api, check, obj), seen=seen.setdefault(id(check), {}),
                                            now=time.monotonic())
                    if problem is not None:
                        raise GateFailed(f"{describe(check)}: {problem}")
            except kube.KubeUnavailable as exc:
                ok, why = False, str(exc)
            if not ok:
                still.append(check)
                last = why
        pending = still
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise GateFailed(f"health gate timed out after {timeout:g}s: {last}")
        await asyncio.sleep(POLL_SECONDS)


async def health(api: Any, checks: list[dict[str, Any]]) -> tuple[bool, str]:
    """One pass over ``checks`` (for supervision): (healthy, first reason it is not)."""
    for check in checks:
        try:
            ok, why = await probe(api, check)
        except GateFailed as exc:
            return False, str(exc)
        if not ok:
            return False, why
    return True, ""


def unit_checks(unit: model.Unit, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The component's gate: its declared checks plus those its own objects imply."""
    declared = [normalise(c, namespace=unit.namespace) for c in unit.checks]
    seen = {(c["kind"], c["namespace"], c["name"]) for c in declared}
    return declared + [c for c in implied_checks(objects) if (c["kind"], c["namespace"], c["name"]) not in seen]
