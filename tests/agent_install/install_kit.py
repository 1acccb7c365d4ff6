"""Helpers for the install-engine tests: throwaway keys, synthetic bundles, an agent, cluster views."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from agent import kube
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.install import journal, model
from agent.state import StateStore
from bundles import keys, pack, trust
from bundles.manifest import Component, HealthCheck, Manifest, Source, TierPolicy

ROOT = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-m", "agent.cli"]

TIERS = {
    1: TierPolicy(priority_class_name=None, tolerate_control_plane=True, spread=True),
    2: TierPolicy(tolerate_control_plane=True, spread=True),
    3: TierPolicy(spread=True),
    4: TierPolicy(),
}


@dataclass
class Keys:
    private: Any
    root_path: Path


def make_trust(trust_dir: Path) -> Keys:
    priv = keys.generate()
    root = trust.make_root(release=[priv.public_key()], threshold=1,
                           expires=datetime.now(UTC) + timedelta(days=365))
    env = trust.sign_root(root, keys=[priv])
    path = trust_dir / "root.json"
    trust.save_root(path, env.to_json())
    return Keys(private=priv, root_path=path)


@dataclass
class Comp:
    name: str
    layer: int
    tier: int
    objects: list[dict[str, Any]]
    namespace: str | None = None
    depends_on: tuple[str, ...] = ()
    checks: tuple[dict[str, Any], ...] = ()


def build_bundle(
    out: Path, *, k: Keys, comps: Iterable[Comp], version: str, release: int, name: str = "site",
    created: datetime | None = None,
) -> Path:
    """A signed bundle with one YAML file per component."""
    src = out.parent / f".src-{out.stem}"
    src.mkdir(parents=True, exist_ok=True)
    files, components, sources = [], [], {}
    for comp in comps:
        rel = f"{comp.name}/objects.yaml"
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump_all(comp.objects, sort_keys=False))
        files.append(pack.file_entry(rel, path))
        sources[rel] = path
        components.append(Component(
            name=comp.name, layer=comp.layer, tier=comp.tier, depends_on=comp.depends_on, namespace=comp.namespace,
            files=(rel,), source=Source(type="files", paths=(f"inline:{rel}",)),
            health_checks=tuple(HealthCheck.model_validate(c) for c in comp.checks),
        ))
    created = created or datetime.now(UTC) - timedelta(minutes=10) + timedelta(seconds=release)
    manifest = Manifest(
        name=name, version=version, release=release, created=created, expires=created + timedelta(days=30),
        files=tuple(files), components=tuple(components), tiers=TIERS,
    )
    pack.write_bundle(out, manifest=manifest, sources=sources, keys=[k.private])
    return out


# --- a small site: 5 components over 4 layers, CRD + CR, every workload kind ------------------------


def _deploy(name: str, ns: str | None, *, replicas: int = 1, image: str = "nginx:1.27",
            node_selector: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": name, "image": image}]}
    if node_selector:
        spec["nodeSelector"] = node_selector
    meta: dict[str, Any] = {"name": name}
    if ns:
        meta["namespace"] = ns
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": spec}},
    }


def _cm(name: str, ns: str | None, data: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ns:
        meta["namespace"] = ns
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com", "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [{"name": "v1", "served": True, "storage": True,
                      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}


def site_v1() -> list[Comp]:
    return [
        Comp("base", 0, 1, [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo-a"}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo-b"}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo-old"}},
            _cm("site-info", "demo-a", {"site": "v1"}),
        ]),
        Comp("crds", 0, 1, [CRD]),
        Comp("app-a", 1, 2, [
            _cm("app-a-config", None, {"mode": "one", "level": "1"}),
            _deploy("web", None, replicas=2),
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
             "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 80}]}},
        ], namespace="demo-a"),
        Comp("app-b", 1, 3, [
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
             "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                      "template": {"metadata": {"labels": {"app": "db"}},
                                   "spec": {"containers": [{"name": "db", "image": "postgres:16"}]}}}},
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "gizmo"}, "spec": {"size": 3}},
        ], namespace="demo-b", depends_on=("app-a",)),
        Comp("node-agent", 2, 3, [
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "node-agent"},
             "spec": {"selector": {"matchLabels": {"app": "node-agent"}},
                      "template": {"metadata": {"labels": {"app": "node-agent"}},
                                   "spec": {"containers": [{"name": "a", "image": "busybox:1.36"}],
                                            "tolerations": [{"operator": "Exists"}]}}}},
        ], namespace="demo-b"),
        Comp("ui", 3, 4, [_deploy("ui", None), _cm("ui-config", None, {"theme": "dark"})], namespace="demo-a"),
    ]


def site_v2() -> list[Comp]:
    """v1 with: app-a's ConfigMap changed, its Service removed, component ui removed, a ConfigMap added,
    namespace demo-old dropped (retained by prune, not deleted)."""
    comps = copy.deepcopy(site_v1())
    out = []
    for comp in comps:
        if comp.name == "ui":
            continue
        if comp.name == "base":
            comp.objects = [o for o in comp.objects if o["metadata"]["name"] != "demo-old"]
        if comp.name == "app-a":
            comp.objects = [o for o in comp.objects if o["kind"] != "Service"]
            comp.objects[0]["data"] = {"mode": "two", "level": "2"}
        if comp.name == "app-b":
            comp.objects.append(_cm("app-b-extra", None, {"added": "v2"}))
        out.append(comp)
    return out


def site_bad() -> list[Comp]:
    """v2 plus a component whose Deployment can never become Available (no node matches)."""
    comps = site_v2()
    comps.append(Comp("broken", 2, 4, [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo-bad"}},
        _deploy("never", None, node_selector={"edgefleet.test/no-such-node": "true"}),
        _cm("broken-config", None, {"x": "y"}),
    ], namespace="demo-a", checks=({"type": "deployment-available", "name": "never", "timeoutSeconds": 4},)))
    return comps


# --- an agent ------------------------------------------------------------------------------------


def write_config(path: Path, *, state_dir: Path, trust_dir: Path, kubeconfig: Path, **install: Any) -> Path:
    doc = {
        "site_id": "test-site",
        "state_dir": str(state_dir),
        "trust_dir": str(trust_dir),
        "kubeconfig": str(kubeconfig),
        "install": {"parallelism": 4, "default_gate_timeout_seconds": 60, **install},
        "link": {"enabled": False},
        "snapshots": {"enabled": False},
        "http": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def context(config_path: Path) -> AgentContext:
    from agent import config as agent_config
    from agent import outbox

    cfg: AgentConfig = agent_config.load(config_path)
    store = StateStore.open(cfg.state_dir)
    outbox.setup(store)
    journal.setup(store)
    return AgentContext(config=cfg, store=store)


def run_agent(
    config: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_FAILPOINT"}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run([*AGENT, "--config", str(config), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def events(store: StateStore, type_: str | None = None) -> list[dict[str, Any]]:
    rows = store.db.execute("SELECT payload FROM outbox WHERE channel='events' ORDER BY id").fetchall()
    out = [json.loads(r["payload"]) for r in rows]
    return [e for e in out if type_ is None or e.get("type") == type_]


# --- what is in the cluster ----------------------------------------------------------------------

KINDS = [
    ("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"), ("apps/v1", "DaemonSet"), ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    ("example.com/v1", "Widget"),
]


async def managed(api: Any, kinds: Iterable[tuple[str, str]] = KINDS) -> dict[str, dict[str, Any]]:
    """key → live object, for every object labelled managed-by=edgefleet."""
    out: dict[str, dict[str, Any]] = {}
    for api_version, kind in kinds:
        try:
            items = await kube.list_objects(api, api_version, kind, managed_fields=True,
                                            label_selector="app.kubernetes.io/managed-by=edgefleet")
        except (kube.UnknownKind, kube.NotFound):
            kube.forget(api, api_version)
            continue
        for item in items:
            out[model.Ref.of(item).key] = item
    return out


def expected(comps: Iterable[Comp]) -> dict[str, dict[str, Any]]:
    """key → bundle object (namespace filled in as the installer does)."""
    out: dict[str, dict[str, Any]] = {}
    for comp in comps:
        for obj in comp.objects:
            o = copy.deepcopy(obj)
            if o["kind"] not in ("Namespace", "CustomResourceDefinition"):
                o["metadata"].setdefault("namespace", comp.namespace or "default")
            out[model.Ref.of(o).key] = o
    return out


async def which_bundle(api: Any, versions: dict[str, list[Comp]], *, name: str = "site") -> str | None:
    """The version whose exact object set, bundle labels and ConfigMap data the cluster holds, else None."""
    live = await managed(api)
    labels = {(o["metadata"].get("labels") or {}).get(model.LABEL_BUNDLE) for o in live.values()}
    for version, comps in versions.items():
        want = expected(comps)
        if set(live) != set(want) or labels != {f"{name}-{version}"}:
            continue
        if all(live[k].get("data") == o.get("data") for k, o in want.items() if o["kind"] == "ConfigMap"):
            return version
    return None


async def wait_for(predicate: Any, *, timeout: float = 30.0, interval: float = 0.2) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def agent(config: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 180) -> tuple[int, str, str]:
    """Run ``edgefleet-agent`` as a real subprocess without blocking the loop the sim runs on."""
    full_env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_FAILPOINT"}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    proc = await asyncio.create_subprocess_exec(
        *AGENT, "--config", str(config), *args, env=full_env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return int(proc.returncode or 0), out.decode(), err.decode()


def state_of(config: Path) -> dict[str, Any]:
    """What the agent's own state says (a fresh read, as `install status` would)."""
    from agent import installer

    ctx = context(config)
    try:
        return installer.report(ctx.store)
    finally:
        ctx.store.close()
