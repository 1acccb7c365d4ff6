"""Degradation on top of a real install: the installer places by tier, the controller degrades,
drift repair leaves the scaled replica counts alone, and recovery restores the bundle's counts."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

import degrade_helpers as h
import pytest

import sim.testing
from agent import degrade, installer, intake, kube, placement, sitestatus
from agent.context import AgentContext
from agent.degrade import records
from agent.degrade.model import ORIGINAL_REPLICAS_ANNOTATION
from bundles.manifest import TierPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent_install"))
import install_kit  # noqa: E402

SPEED = 10.0
ORIGINAL = {s.name: s.replicas for s in h.PLATFORM}
TIER = {s.name: s.tier for s in h.PLATFORM}


def _components() -> list[install_kit.Comp]:
    namespaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                  for ns in sorted({s.namespace for s in h.PLATFORM} - {"kube-system"})]  # fmt: skip
    comps = [install_kit.Comp("base", 0, 1, [*namespaces, *h.priority_classes()])]
    by_component: dict[str, list[h.Spec]] = {}
    for spec in h.PLATFORM:
        by_component.setdefault(spec.component or spec.name, []).append(spec)
    for name, specs in by_component.items():
        comps.append(install_kit.Comp(name, 1, specs[0].tier, [h.raw_manifest(s) for s in specs],
                                      depends_on=("base",)))  # fmt: skip
    return comps


async def _replicas(api: Any) -> dict[str, int]:
    return {name: int(obj["spec"]["replicas"]) for name, obj in (await h.workloads(api)).items()}


@pytest.mark.slow
async def test_degradation_on_a_real_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiers = {int(k): TierPolicy.model_validate(v) for k, v in h.tier_policy().items()}  # the profile's own
    monkeypatch.setattr(install_kit, "TIERS", tiers)
    keys = install_kit.make_trust(tmp_path / "trust")
    bundle = install_kit.build_bundle(tmp_path / "site.bundle", k=keys, comps=_components(), version="1.0.0",
                                      release=1)  # fmt: skip
    async with sim.testing.running(speed=SPEED) as site, kube.connect(site.kubeconfig) as api:
        config = install_kit.write_config(tmp_path / "agent.yaml", state_dir=tmp_path / "state",
                                          trust_dir=tmp_path / "trust", kubeconfig=site.kubeconfig)  # fmt: skip
        ctx = install_kit.context(config)
        await intake.import_bundle(ctx, bundle)
        run = await installer.run_pending(ctx, api)
        assert run is not None and run.state == "committed", run and run.error

        live = await h.workloads(api)
        assert set(live) == set(ORIGINAL)
        for name, obj in live.items():
            spec = placement.pod_spec(obj)
            assert obj["metadata"]["labels"]["edgefleet.io/tier"] == str(TIER[name])
            assert spec["priorityClassName"] == tiers[TIER[name]].priority_class_name
            assert placement.tolerates_control_plane(spec.get("tolerations")) == (TIER[name] <= 2)

        scaled_cfg = h.scaled_config("test-site", tmp_path / "state", site.kubeconfig, speed=SPEED)
        dctx = AgentContext(config=ctx.config.model_copy(update={"degradation": scaled_cfg.degradation}),
                            store=ctx.store)  # fmt: skip
        task = asyncio.create_task(degrade.run(dctx))
        try:
            await h.eventually(lambda: _state_is(dctx, "green"), timeout=15, what="green")
            await site.fail_node("agent-1")
            await h.eventually(lambda: _state_is(dctx, "yellow"), timeout=15, what="yellow")
            await h.eventually(lambda: _async(bool(records.load(dctx.store))), timeout=10, what="a scale-down")
            await asyncio.sleep(1)
            scaled = await _replicas(api)
            assert any(scaled[n] < ORIGINAL[n] for n in ORIGINAL if TIER[n] == 4)

            # Drift repair now: it must apply the live (scaled) counts, not the bundle's.
            from agent.install import drift

            supervisor = drift.Supervisor(ctx, api)
            supervisor.next_drift = 0.0
            await supervisor.tick()
            assert await _replicas(api) == scaled
            objs = await h.workloads(api)
            for name in scaled:
                if scaled[name] < ORIGINAL[name]:
                    assert objs[name]["metadata"]["annotations"][ORIGINAL_REPLICAS_ANNOTATION] == str(ORIGINAL[name])

            await site.restore_node("agent-1")

            async def restored() -> bool:
                return await _replicas(api) == ORIGINAL and not records.load(dctx.store)

            await h.eventually(restored, timeout=40, what="the bundle's replica counts back")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            ctx.store.close()


async def _state_is(ctx: AgentContext, state: str) -> bool:
    return (ctx.store.get(sitestatus.DEGRADATION_KEY) or {}).get("state") == state


async def _async(value: bool) -> bool:
    return value
