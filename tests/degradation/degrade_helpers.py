"""Shared helpers for the degradation tests and bench: a tiered platform deployed into the sim.

Workloads are labelled per the installer's contract and placed with the bundle profile's own
tier policy through ``placement.apply_tier_policy``, so these tests exercise the same objects
the installer would apply, without needing the whole installer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent import kube, placement
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.state import StateStore

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "bundles" / "profiles" / "idp-platform.yaml"
#: The PriorityClasses the profile's tiers name (values as in the IDP Blueprint / the profile).
PRIORITY_VALUES = {
    "platform-infrastructure": 1_000_000,
    "edgefleet-tier-2": 300_000,
    "platform-events": 200_000,
    "platform-dashboards": 5_000,
}


def tier_policy() -> dict[int, Any]:
    doc = yaml.safe_load(PROFILE.read_text())
    return {int(k): v for k, v in doc["tiers"].items()}


@dataclass(frozen=True)
class Spec:
    name: str
    namespace: str
    tier: int
    replicas: int
    cpu: str
    memory: str
    kind: str = "Deployment"
    component: str = ""


#: An IDP-like platform sized for three 4-CPU/4-GiB nodes: everything fits on three nodes, tiers 1-2
#: fit on the server node alone, tiers 1-3 fit on the server plus one worker, tier 4 does not.
PLATFORM = [
    Spec("cilium-operator", "kube-system", 1, 1, "100m", "128Mi", component="cilium"),
    Spec("argocd-server", "argocd", 2, 2, "300m", "256Mi", component="argocd"),
    Spec("argocd-repo-server", "argocd", 2, 1, "300m", "256Mi", component="argocd"),
    Spec("argocd-application-controller", "argocd", 2, 1, "300m", "512Mi", "StatefulSet", "argocd"),
    Spec("prometheus-k8s", "observability", 2, 1, "500m", "1Gi", "StatefulSet", "kube-prometheus-stack"),
    Spec("loki", "observability", 3, 1, "500m", "1Gi", "StatefulSet", "loki"),
    Spec("argo-events-controller", "argo-events", 3, 1, "250m", "256Mi", component="argo-events"),
    Spec("grafana", "observability", 4, 2, "1", "512Mi", component="grafana"),
    Spec("backstage", "backstage", 4, 2, "1", "512Mi", component="backstage"),
    Spec("kyverno", "kyverno", 4, 1, "500m", "256Mi", component="kyverno"),
]


def raw_manifest(spec: Spec) -> dict[str, Any]:
    """The workload as upstream would ship it: no edgefleet labels, no tier placement."""
    obj: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": spec.kind,
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": {"app": spec.name}},
            "template": {
                "metadata": {"labels": {"app": spec.name}},
                "spec": {"containers": [{"name": "main", "image": f"example/{spec.name}:1",
                                         "resources": {"requests": {"cpu": spec.cpu, "memory": spec.memory}}}]},
            },  # fmt: skip
        },
    }
    if spec.kind == "StatefulSet":
        obj["spec"]["serviceName"] = spec.name
    return obj


def manifest(spec: Spec, policy: dict[int, Any]) -> dict[str, Any]:
    """What the installer applies: the contract's labels (object and pod template) + the tier placement."""
    obj = raw_manifest(spec)
    component = spec.component or spec.name
    obj["metadata"]["labels"] = {
        "app.kubernetes.io/managed-by": "edgefleet",
        "edgefleet.io/component": component,
        "edgefleet.io/layer": "2",
        "edgefleet.io/tier": str(spec.tier),
        "edgefleet.io/bundle": "test-1.0.0",
    }
    obj["spec"]["template"]["metadata"]["labels"].update(
        {"edgefleet.io/component": component, "edgefleet.io/tier": str(spec.tier)}
    )
    return placement.apply_tier_policy(obj, tier=spec.tier, policy=policy)


def priority_classes() -> list[dict[str, Any]]:
    return [
        {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name},
         "value": value, "globalDefault": False}
        for name, value in PRIORITY_VALUES.items()
    ]  # fmt: skip


async def deploy_platform(api: Any, specs: list[Spec] = PLATFORM) -> None:
    policy = tier_policy()
    for pc in priority_classes():
        await kube.apply(api, pc)
    for ns in sorted({s.namespace for s in specs}):
        await kube.apply(api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for spec in specs:
        await kube.apply(api, manifest(spec, policy))


async def workloads(api: Any) -> dict[str, dict[str, Any]]:
    """name → live Deployment/StatefulSet."""
    out: dict[str, dict[str, Any]] = {}
    for kind in ("Deployment", "StatefulSet"):
        for obj in await kube.list_objects(api, "apps/v1", kind, label_selector="edgefleet.io/tier",
                                           managed_fields=True):
            out[obj["metadata"]["name"]] = obj
    return out


async def pods(api: Any) -> list[dict[str, Any]]:
    return await kube.list_objects(api, "v1", "Pod", label_selector="edgefleet.io/tier")


def pod_app(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["labels"].get("app", ""))


def running_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


async def running_by_app(api: Any, *, nodes: set[str] | None = None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pod in await pods(api):
        if running_ready(pod) and (nodes is None or pod["spec"].get("nodeName") in nodes):
            counts[pod_app(pod)] = counts.get(pod_app(pod), 0) + 1
    return counts


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> float:
    """Wait until ``check()`` is true; return the seconds it took. Fails with ``what`` on timeout."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def scaled_config(site_id: str, state_dir: Path, kubeconfig: Path, *, speed: float, **degradation: Any) -> AgentConfig:
    """An agent config whose degradation timings are Kubernetes-like, divided by the sim speed."""
    timings = {
        "lease_timeout_seconds": 20.0 / speed,
        "degrade_dwell_seconds": 5.0 / speed,
        "recover_dwell_seconds": 60.0 / speed,
        "restore_stagger_seconds": 10.0 / speed,
        "poll_interval_seconds": max(0.05, 1.0 / speed),
    }
    timings.update(degradation)
    return AgentConfig(site_id=site_id, state_dir=state_dir, kubeconfig=kubeconfig, degradation=timings)


def context(config: AgentConfig) -> AgentContext:
    from agent import outbox

    store = StateStore.open(config.state_dir)
    outbox.setup(store)
    return AgentContext(config=config, store=store)


def events(store: StateStore, prefix: str = "degradation.") -> list[dict[str, Any]]:
    """Degradation events waiting in the outbox, oldest first."""
    import json

    rows = store.db.execute("SELECT payload FROM outbox WHERE channel='events' ORDER BY id").fetchall()
    out = [json.loads(bytes(r["payload"])) for r in rows]
    return [e for e in out if str(e.get("type", "")).startswith(prefix)]
