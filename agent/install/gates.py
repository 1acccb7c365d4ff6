"""Health gates: a component is installed only once its workloads are healthy.

Checks come from two places: every workload/CRD the component applies gets an implied check
(Deployments Available, StatefulSets and DaemonSets ready, CRDs Established, Jobs complete),
and the bundle may declare more (``healthChecks``: the same types on other objects, or a
``condition`` on any object). A component's gate passes when all its checks pass, and fails
when its timeout runs out first (the largest declared ``timeoutSeconds``, else the config's
default), or at once when a Job reports ``Failed`` (waiting cannot fix that).

Checks read ``status`` fields only and compare ``observedGeneration`` where the API has it,
so a gate never passes on the status of the *previous* spec.

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


def evaluate(check: Mapping[str, Any], obj: Mapping[str, Any] | None) -> tuple[bool, str]:
    """(passed, why not). Raises :class:`GateFailed` for a terminal failure."""
    namespace = check.get("namespace")
    what = f"{check['kind']} {namespace + '/' if namespace else ''}{check['name']}"
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


async def probe(api: Any, check: Mapping[str, Any]) -> tuple[bool, str]:
    # agent.kube (kubernetes-asyncio, aiohttp: ~20 MiB) is imported where the API is used, so
    # the one-shot renderer (agent.install.cache), which needs only the check builders, stays small.
    from agent import kube

    # A CRD's Established condition needs its status only; its spec (the schema) can be ~700 KB.
    fields = ("status",) if check["type"] == "crd-established" else None
    try:
        obj = await kube.get(api, str(check["apiVersion"]), str(check["kind"]), str(check["name"]),
                             namespace=check.get("namespace"), fields=fields)
    except kube.UnknownKind:
        obj = None
    return evaluate(check, obj)


async def wait(api: Any, checks: list[dict[str, Any]], *, timeout: float) -> None:
    """Return when every check passes; raise :class:`GateFailed` on timeout or terminal failure.

    An unreachable API server does not fail the gate by itself; only the timeout does, so a
    short API blip during a long install is not a rollback.
    """
    from agent import kube

    pending = list(checks)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        still: list[dict[str, Any]] = []
        for check in pending:
            try:
                ok, why = await probe(api, check)
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
