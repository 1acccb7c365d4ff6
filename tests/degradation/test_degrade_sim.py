"""The degradation controller against the sim (accelerated clock), through the real client code.

Timings are Kubernetes' and the agent's defaults divided by ``SPEED`` (see
``degrade_helpers.scaled_config``): 40 s NotReady → 4 s, 300 s eviction → 30 s, the agent's 60 s
recover dwell → 6 s.

The broker is down throughout: the agent's MQTT link runs next to the controller, against a port where
nothing listens, so every scenario shows the same behaviour offline and every event waiting in the
outbox. That those events reach the hub once the broker returns: test_degrade_hub.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import brokers
import degrade_helpers as h
import pytest
import yaml
from prometheus_client import REGISTRY

import sim.testing
from agent import degrade, kube, link, metrics, sitestatus
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.degrade import records
from agent.degrade.model import ORIGINAL_REPLICAS_ANNOTATION

SPEED = 10.0
ORIGINAL = {s.name: s.replicas for s in h.PLATFORM}
TIER = {s.name: s.tier for s in h.PLATFORM}


@contextlib.asynccontextmanager
async def scenario(tmp_path: Path, **degradation: Any) -> AsyncIterator[tuple[Any, Any, AgentContext]]:
    """A sim site with the tiered platform Running, the controller task started on it, and the link
    task trying in vain to reach a broker that is down."""
    async with sim.testing.running(speed=SPEED) as site, kube.connect(site.kubeconfig) as api:
        await h.deploy_platform(api)
        await h.eventually(lambda: _all_running(api), timeout=30, what="the platform Running")
        ctx = h.context(_broker_down(h.scaled_config("site-a", tmp_path / "state", site.kubeconfig, speed=SPEED,
                                                     **degradation)))  # fmt: skip
        tasks = [asyncio.create_task(degrade.run(ctx)), asyncio.create_task(link.run(ctx))]
        try:
            await h.eventually(lambda: _state_is(ctx, "green"), timeout=10, what="green")
            yield site, api, ctx
            assert not any(t.done() for t in tasks), "a task ended"  # the link keeps retrying, no crash
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            ctx.store.close()


def _broker_down(config: AgentConfig) -> AgentConfig:
    """The config with the link pointed at a port where no broker listens."""
    link_cfg = config.link.model_copy(update={"port": brokers.free_port(), "backoff_min_seconds": 0.2,
                                              "backoff_max_seconds": 1.0})  # fmt: skip
    return config.model_copy(update={"link": link_cfg})


async def _all_running(api: Any) -> bool:
    return await h.running_by_app(api) == ORIGINAL


async def _state_is(ctx: AgentContext, state: str) -> bool:
    return (ctx.store.get(sitestatus.DEGRADATION_KEY) or {}).get("state") == state


def _state(ctx: AgentContext) -> dict[str, Any]:
    return ctx.store.get(sitestatus.DEGRADATION_KEY) or {}


async def _replicas(api: Any) -> dict[str, int]:
    return {name: int(obj["spec"]["replicas"]) for name, obj in (await h.workloads(api)).items()}


def _why(ctx: AgentContext) -> tuple[set[tuple[str, str]], dict[str, float]]:
    """/metrics' why, refreshed from the persisted state: the (state, reason) series at 1, and node -> available."""
    metrics.refresh(ctx.store)
    info: set[tuple[str, str]] = set()
    nodes: dict[str, float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "edgefleet_agent_site_state_info" and sample.value == 1:
                info.add((sample.labels["state"], sample.labels["reason"]))
            elif sample.name == "edgefleet_agent_node_available":
                nodes[sample.labels["node"]] = sample.value
    return info, nodes


def _transitions(ctx: AgentContext) -> list[tuple[str, str]]:
    return [(e["data"]["from"], e["data"]["to"]) for e in h.events(ctx.store, "degradation.transition")]


async def test_all_healthy_green_nothing_scaled(tmp_path: Path) -> None:
    async with scenario(tmp_path) as (_site, api, ctx):
        await asyncio.sleep(2)  # many ticks
        st = _state(ctx)
        assert st["state"] == "green" and st["scaled_down"] == []
        assert [n["ready"] for n in st["nodes"]] == [True, True, True]
        assert st["nodes"][0] == {"name": "server-0", "ready": True, "control_plane": True}
        assert await _replicas(api) == ORIGINAL
        assert records.load(ctx.store) == {}
        assert h.events(ctx.store) == [] and not ctx.limp_home.is_set()


async def test_one_worker_fails_yellow_tier4_shrinks_tiers_2_3_run(tmp_path: Path) -> None:
    async with scenario(tmp_path) as (site, api, ctx):
        await site.fail_node("agent-1")
        await h.eventually(lambda: _state_is(ctx, "yellow"), timeout=10, what="yellow")
        live = {"server-0", "agent-0"}

        async def settled() -> bool:
            running = await h.running_by_app(api, nodes=live)
            return all(running.get(n, 0) == ORIGINAL[n] for n in ORIGINAL if TIER[n] <= 3)

        await h.eventually(settled, timeout=20, what="tiers 1-3 Running on the remaining nodes")
        replicas = await _replicas(api)
        t4 = {n: r for n, r in replicas.items() if TIER[n] == 4}
        assert 0 < sum(t4.values()) < sum(ORIGINAL[n] for n in t4), t4
        assert all(replicas[n] == ORIGINAL[n] for n in ORIGINAL if TIER[n] <= 3)
        live_objs = await h.workloads(api)
        journal = records.load(ctx.store)
        for name, count in t4.items():
            annotations = live_objs[name]["metadata"].get("annotations") or {}
            if count < ORIGINAL[name]:
                assert annotations[ORIGINAL_REPLICAS_ANNOTATION] == str(ORIGINAL[name])
                (record,) = [r for r in journal.values() if r.name == name]
                assert record.original == ORIGINAL[name] and record.target == count
                managers = {m["manager"] for m in live_objs[name]["metadata"]["managedFields"]}
                assert "edgefleet-degradation" in managers
        st = _state(ctx)
        assert {w["name"] for w in st["scaled_down"]} == {r.name for r in journal.values()}
        assert "agent-1" in st["reason"] and not ctx.limp_home.is_set()
        # What runs on the remaining nodes fits: no tier-4 pod left Pending for long.
        await h.eventually(
            lambda: _no_pending(api), timeout=10, what="every remaining pod scheduled after the scale-down"
        )
        assert _transitions(ctx) == [("green", "yellow")]

        # Visibility: /metrics (derived from the persisted state) and `edgefleet-agent status` (another process).
        assert _why(ctx) == ({("yellow", "node-lost")}, {"server-0": 1, "agent-0": 1, "agent-1": 0})
        assert REGISTRY.get_sample_value("edgefleet_agent_site_state", {"state": "yellow"}) == 1
        assert REGISTRY.get_sample_value("edgefleet_agent_scaled_down_workloads") == len(journal)
        config = tmp_path / "agent.yaml"
        config.write_text(yaml.safe_dump({"site_id": "site-a", "state_dir": str(tmp_path / "state")}))
        out = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(config), "status"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "YELLOW (node-lost: agent-1 lost" in out.stdout
        for record in journal.values():
            assert f"{record.namespace}/{record.name} tier 4: {record.target}/{record.original} replicas" in out.stdout


async def _no_pending(api: Any) -> bool:
    return not [p for p in await h.pods(api) if not p["spec"].get("nodeName")]


async def test_both_workers_fail_red_lifeboat_then_recovery_in_order(tmp_path: Path) -> None:
    async with scenario(tmp_path) as (site, api, ctx):
        stranded = {p["metadata"]["name"] for p in await h.pods(api)
                    if TIER[h.pod_app(p)] == 2 and p["spec"].get("nodeName") != "server-0"}  # fmt: skip
        await site.fail_node("agent-0")
        await site.fail_node("agent-1")
        await h.eventually(lambda: _state_is(ctx, "red"), timeout=10, what="red")
        assert ctx.limp_home.is_set() and _state(ctx)["limp_home"] is True

        async def lifeboat() -> bool:
            on_server = await h.running_by_app(api, nodes={"server-0"})
            return all(on_server.get(n, 0) == ORIGINAL[n] for n in ORIGINAL if TIER[n] == 2)

        # Tier 2 Running on the server node because the agent deleted the pods stuck on the dead
        # workers (how long that takes vs Kubernetes' own eviction: bench/degradation.py).
        await h.eventually(lifeboat, timeout=20, what="tier 2 Running on server-0")
        deleted = {p.split("/")[1] for e in h.events(ctx.store, "degradation.pods-deleted") for p in e["data"]["pods"]}
        assert stranded and stranded <= deleted
        replicas = await _replicas(api)
        assert all(replicas[n] == 0 for n in ORIGINAL if TIER[n] >= 3), replicas
        assert all(replicas[n] == ORIGINAL[n] for n in ORIGINAL if TIER[n] <= 2)
        assert {w["name"] for w in _state(ctx)["scaled_down"]} == {n for n in ORIGINAL if TIER[n] >= 3}
        assert _why(ctx) == ({("red", "control-plane-only")}, {"server-0": 1, "agent-0": 0, "agent-1": 0})

        await site.restore_node("agent-0")
        await site.restore_node("agent-1")
        # Nothing is restored before the recover dwell (60 s → 6 s).
        await asyncio.sleep(3)
        assert _state(ctx)["state"] == "red"
        assert await _replicas(api) == replicas
        await h.eventually(lambda: _state_is(ctx, "green"), timeout=20, what="green")
        await h.eventually(lambda: _all_restored(api, ctx), timeout=20, what="every workload restored")
        assert not ctx.limp_home.is_set()
        assert _why(ctx) == ({("green", "none")}, {"server-0": 1, "agent-0": 1, "agent-1": 1})
        objs = await h.workloads(api)
        assert not any(ORIGINAL_REPLICAS_ANNOTATION in (o["metadata"].get("annotations") or {}) for o in objs.values())
        await h.eventually(lambda: _all_running(api), timeout=20, what="every original replica Running again")
        # Restored in reverse tier order: every tier-3 restore before any tier-4 restore.
        restored_events = h.events(ctx.store, "degradation.restored")
        restored = [e["data"]["tier"] for e in restored_events]
        assert restored and restored == sorted(restored) and set(restored) == {3, 4}
        # Staggered: tier 4 starts restore_stagger_seconds (10 s → 1 s) after tier 3, not on the next tick
        # (0.1 s). A lower bound only (a loaded machine can only stretch it); 0.8 leaves room for the jitter
        # of the scale calls made between a tick's start and its first event.
        first = {tier: min(datetime.fromisoformat(e["ts"]) for e in restored_events if e["data"]["tier"] == tier)
                 for tier in (3, 4)}  # fmt: skip
        assert (first[4] - first[3]).total_seconds() >= 0.8 * ctx.config.degradation.restore_stagger_seconds
        assert _transitions(ctx) == [("green", "red"), ("red", "green")]


async def _all_restored(api: Any, ctx: AgentContext) -> bool:
    return await _replicas(api) == ORIGINAL and records.load(ctx.store) == {} and _state(ctx)["scaled_down"] == []


@pytest.mark.slow
async def test_flapping_node_does_not_oscillate(tmp_path: Path) -> None:
    # Recover dwell 12 s here: the flaps' healthy windows (2 s) stay well inside it even on a busy machine.
    async with scenario(tmp_path, recover_dwell_seconds=12.0) as (site, api, ctx):
        await site.fail_node("agent-1")
        await h.eventually(lambda: _state_is(ctx, "yellow"), timeout=10, what="yellow")
        scaled = await _replicas(api)
        for _ in range(3):  # healthy 2 s, then dead 3 s (past the 2 s lease timeout)
            await site.restore_node("agent-1")
            await asyncio.sleep(2)
            await site.fail_node("agent-1")
            await asyncio.sleep(3)
        assert _state(ctx)["state"] == "yellow"
        assert await _replicas(api) == scaled
        assert h.events(ctx.store, "degradation.restored") == []
        assert _transitions(ctx) == [("green", "yellow")]
        await site.restore_node("agent-1")
        await h.eventually(lambda: _all_restored(api, ctx), timeout=40, what="restored after steady health")
        assert _transitions(ctx) == [("green", "yellow"), ("yellow", "green")]


async def test_api_unreachable_is_black_and_recovers(tmp_path: Path) -> None:
    """The API server dies (sim process killed): Black, recorded; a new one on the same address: Green."""
    port = brokers.free_port()
    first = sim.testing.start_process(speed=SPEED, workdir=_mkdir(tmp_path / "sim1"), extra_args=["--port", str(port)])
    ctx = h.context(_broker_down(h.scaled_config("site-b", tmp_path / "state", first.kubeconfig, speed=SPEED)))
    task = asyncio.create_task(degrade.run(ctx))
    link_task = asyncio.create_task(link.run(ctx))
    second = None
    try:
        await h.eventually(lambda: _state_is(ctx, "green"), timeout=15, what="green")
        first.stop()
        await h.eventually(lambda: _state_is(ctx, "black"), timeout=15, what="black")
        assert "unreachable" in _state(ctx)["reason"]
        assert _why(ctx)[0] == {("black", "api-unreachable")}
        assert not ctx.limp_home.is_set()  # Black leaves limp-home as it was
        second = sim.testing.start_process(
            speed=SPEED, workdir=_mkdir(tmp_path / "sim2"), extra_args=["--port", str(port)]
        )
        await h.eventually(lambda: _state_is(ctx, "green"), timeout=15, what="green again")
        assert _transitions(ctx) == [("green", "black"), ("black", "green")]
        assert not link_task.done()
    finally:
        for t in (task, link_task):
            t.cancel()
        for t in (task, link_task):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        ctx.store.close()
        first.stop()
        if second is not None:
            second.stop()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


async def test_without_pod_eviction_kubernetes_timing_applies(tmp_path: Path) -> None:
    """With ``evict_lost_pods`` off, tier 2 on a dead node waits for Kubernetes' own eviction."""
    async with scenario(tmp_path, evict_lost_pods=False) as (site, api, ctx):
        await site.fail_node("agent-0")
        await site.fail_node("agent-1")
        await h.eventually(lambda: _state_is(ctx, "red"), timeout=10, what="red")
        await asyncio.sleep(5 * 40 / SPEED / 4)  # well past detection, before the 30 s eviction
        stuck = [p for p in await h.pods(api) if p["spec"].get("nodeName") != "server-0" and TIER[h.pod_app(p)] == 2]
        assert stuck, "tier-2 pods on dead nodes stay until Kubernetes evicts them"
        assert not h.events(ctx.store, "degradation.pods-deleted")


async def test_daemonset_pods_on_a_lost_node_are_left_alone(tmp_path: Path) -> None:
    """A tier-2 DaemonSet tolerating every taint (like node-exporter) is recreated on its node at once;
    force-deleting it would loop for as long as the node is lost, flooding the outbox."""
    async with scenario(tmp_path) as (site, api, ctx):
        ds = {
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "node-exporter", "namespace": "observability",
                         "labels": {"edgefleet.io/component": "kube-prometheus", "edgefleet.io/tier": "2"}},
            "spec": {
                "selector": {"matchLabels": {"app": "node-exporter"}},
                "template": {
                    "metadata": {"labels": {"app": "node-exporter", "edgefleet.io/tier": "2",
                                            "edgefleet.io/component": "kube-prometheus"}},
                    "spec": {"tolerations": [{"operator": "Exists"}],
                             "containers": [{"name": "c", "image": "quay.io/prometheus/node-exporter:v1.9.1"}]},
                },
            },
        }  # fmt: skip
        await kube.apply(api, ds, field_manager="test", force=True)

        async def ds_everywhere() -> bool:
            pods = [p for p in await h.pods(api) if p["metadata"]["name"].startswith("node-exporter")]
            return len({p["spec"].get("nodeName") for p in pods}) == 3

        await h.eventually(ds_everywhere, timeout=15, what="node-exporter on every node")
        await site.fail_node("agent-0")
        await site.fail_node("agent-1")
        await h.eventually(lambda: _state_is(ctx, "red"), timeout=10, what="red")
        await asyncio.sleep(3)  # several controller passes while the nodes stay lost
        deleted = [p for e in h.events(ctx.store, "degradation.pods-deleted") for p in e["data"]["pods"]]
        assert not [p for p in deleted if "node-exporter" in p], deleted
        assert len(deleted) == len(set(deleted)), "a pod was force-deleted twice"
