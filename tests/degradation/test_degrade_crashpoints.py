"""Every crash point of a scale-down and of a restore has a defined next state.

The controller is stopped dead (an exception out of the tick, in-memory state thrown away, as a
SIGKILL would) right before a chosen API write; a fresh controller on the same DB must converge:
scaled with the original recorded, and later restored to exactly the original.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import degrade_helpers as h
import pytest

import sim.testing
from agent import kube
from agent.degrade import controller, records
from agent.degrade.model import ORIGINAL_REPLICAS_ANNOTATION

SPEED = 10.0
ORIGINAL = {s.name: s.replicas for s in h.PLATFORM}


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, nothing catches it."""


async def drive(ctl: controller.Controller, api: Any, until: Callable[[], Awaitable[bool]], *, timeout: float) -> None:
    async def step() -> bool:
        await ctl.tick(api)
        return await until()

    await h.eventually(step, timeout=timeout, interval=0.1, what="the controller to converge")


async def _annotated(api: Any) -> dict[str, str]:
    out = {}
    for name, obj in (await h.workloads(api)).items():
        value = (obj["metadata"].get("annotations") or {}).get(ORIGINAL_REPLICAS_ANNOTATION)
        if value is not None:
            out[name] = value
    return out


async def _replicas(api: Any) -> dict[str, int]:
    return {name: int(obj["spec"]["replicas"]) for name, obj in (await h.workloads(api)).items()}


@pytest.mark.parametrize("point", ["before-annotation", "before-scale", "before-unannotate"])
async def test_crash_point(tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with sim.testing.running(speed=SPEED) as site, kube.connect(site.kubeconfig) as api:
        await h.deploy_platform(api)
        await h.eventually(lambda: _true_when(api), timeout=30, what="the platform Running")
        ctx = h.context(h.scaled_config("site-c", tmp_path / "state", site.kubeconfig, speed=SPEED))
        real_patch = kube.patch
        armed = {"on": point != "before-unannotate"}

        async def crashing_patch(*args: Any, **kwargs: Any) -> dict[str, Any]:
            body = args[4] if len(args) > 4 else kwargs.get("body")
            annotations = (body or {}).get("metadata", {}).get("annotations") or {}
            if armed["on"] and (
                (point == "before-annotation" and annotations.get(ORIGINAL_REPLICAS_ANNOTATION))
                or (point == "before-scale" and kwargs.get("subresource") == "scale")
                or (point == "before-unannotate" and ORIGINAL_REPLICAS_ANNOTATION in annotations
                    and annotations[ORIGINAL_REPLICAS_ANNOTATION] is None)
            ):  # fmt: skip
                raise Crash(point)
            return await real_patch(*args, **kwargs)

        monkeypatch.setattr(controller.kube, "patch", crashing_patch)
        ctl = controller.Controller.load(ctx)
        await site.fail_node("agent-1")
        if point != "before-unannotate":
            with pytest.raises(Crash):
                await drive(ctl, api, lambda: _false(), timeout=20)
            journal = records.load(ctx.store)
            assert journal, "the journal row is written before the cluster is touched"
            (first,) = [r for r in journal.values() if r.tier == 4][:1]
            assert first.original == ORIGINAL[first.name]
            live = await _replicas(api)
            assert live[first.name] == ORIGINAL[first.name]  # the crash came before the scale
            if point == "before-annotation":
                assert first.name not in await _annotated(api)
            armed["on"] = False

        # A new process: fresh memory, same DB.
        ctl = controller.Controller.load(ctx)

        async def degraded() -> bool:
            journal = records.load(ctx.store)
            live, annotated = await _replicas(api), await _annotated(api)
            return bool(journal) and all(
                live[r.name] == r.target and annotated.get(r.name) == str(ORIGINAL[r.name]) for r in journal.values()
            )

        await drive(ctl, api, degraded, timeout=20)
        scaled = {r.name: r.target for r in records.load(ctx.store).values()}
        assert all(target < ORIGINAL[name] for name, target in scaled.items())

        armed["on"] = point == "before-unannotate"
        await site.restore_node("agent-1")
        if point == "before-unannotate":
            with pytest.raises(Crash):
                await drive(ctl, api, lambda: _false(), timeout=30)
            # Scaled back up, annotation and journal row still there: the restore is half done.
            assert records.load(ctx.store)
            armed["on"] = False
            ctl = controller.Controller.load(ctx)

        async def restored() -> bool:
            return await _replicas(api) == ORIGINAL and not await _annotated(api) and not records.load(ctx.store)

        await drive(ctl, api, restored, timeout=30)
        ctx.store.close()


async def _false() -> bool:
    return False


async def _true_when(api: Any) -> bool:
    return await h.running_by_app(api) == ORIGINAL
