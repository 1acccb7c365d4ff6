"""The kill matrix: SIGKILL a real agent process at journal steps of an install, an upgrade and a
rollback; a restarted agent must converge to exactly the old or the new bundle, and say which.

Failpoints (agent/install/journal.py): ``<step>`` kills right after the step's ``begin`` was
committed, ``<step>@done`` after the step ran but before ``done`` was journaled, and
``apply:<component>#N`` after the N-th object of a component was applied (a half-applied
component). Every point is checked to have really killed the process (exit -9).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from install_kit import agent, context, managed, site_bad, site_v1, site_v2, state_of, which_bundle

from agent import installer, intake

VERSIONS = {"1.0.0": site_v1(), "2.0.0": site_v2(), "3.0.0": site_bad()}
FAST = {"apply:app-a#2", "rollback:remove"}

INSTALL_POINTS = [
    "prepare", "prepare@done", "apply:base", "apply:base#1", "apply:crds@done", "gate:crds", "apply:app-a#2",
    "gate:app-a@done", "apply:app-b", "apply:app-b#1", "apply:node-agent#1", "gate:node-agent", "apply:ui@done",
    "gate:ui@done", "prune", "prune@done", "commit", "commit@done",
]
UPGRADE_POINTS = [
    "prepare", "prepare@done", "apply:app-a#1", "gate:app-a", "apply:app-b#2", "gate:app-b@done",
    "gate:node-agent@done", "prune", "prune@done", "commit", "commit@done",
]
ROLLBACK_POINTS = [
    "gate:broken", "rollback:remove", "rollback:remove@done", "rollback:apply:base", "rollback:apply:app-a#1",
    "rollback:gate:app-b", "rollback:finish", "rollback:finish@done",
]


def _marks(point: str) -> Any:
    return () if point in FAST else (pytest.mark.slow,)


async def _converged(api: Any, config: Path, allowed: set[str]) -> str:
    live = await managed(api)
    which = "none" if not live else await which_bundle(api, VERSIONS)
    assert which in allowed, f"cluster holds a mix (neither of {sorted(allowed)})"
    state = state_of(config)
    assert state["run"] is None, state["run"]
    assert state["current"] == (None if which == "none" else f"site-{which}")
    assert state["install_state"] == "idle"
    return str(which)


async def _kill_at(config: Path, bundle: Path, point: str) -> None:
    code, out, err = await agent(config, "bundle", "import", str(bundle), "--wait",
                                 env={"EDGEFLEET_FAILPOINT": point})
    assert code == -signal.SIGKILL, f"failpoint {point} never hit: rc={code} {out} {err[-2000:]}"


async def _install_in_process(config: Path, api: Any, bundle: Path) -> None:
    ctx = context(config)
    try:
        await intake.import_bundle(ctx, bundle)
        run = await installer.run_pending(ctx, api)
        assert run is not None and run.state == "committed"
    finally:
        ctx.store.close()


@pytest.mark.parametrize("point", [pytest.param(p, marks=_marks(p)) for p in INSTALL_POINTS])
async def test_kill_during_install(point: str, site_config: Path, api: Any, bundles: dict[str, Path]) -> None:
    await _kill_at(site_config, bundles["1.0.0"], point)
    code, _out, err = await agent(site_config, "install", "run")
    assert code == 0, err[-2000:]
    assert await _converged(api, site_config, {"none", "1.0.0"}) == "1.0.0"  # resumed forward


@pytest.mark.parametrize("point", [pytest.param(p, marks=_marks(p)) for p in UPGRADE_POINTS])
async def test_kill_during_upgrade(point: str, site_config: Path, api: Any, bundles: dict[str, Path]) -> None:
    await _install_in_process(site_config, api, bundles["1.0.0"])
    await _kill_at(site_config, bundles["2.0.0"], point)
    code, _out, err = await agent(site_config, "install", "run")
    assert code == 0, err[-2000:]
    assert await _converged(api, site_config, {"1.0.0", "2.0.0"}) == "2.0.0"


@pytest.mark.parametrize("point", [pytest.param(p, marks=_marks(p)) for p in ROLLBACK_POINTS])
async def test_kill_during_rollback(point: str, site_config: Path, api: Any, bundles: dict[str, Path]) -> None:
    await _install_in_process(site_config, api, bundles["2.0.0"])
    await _kill_at(site_config, bundles["3.0.0"], point)
    code, _out, err = await agent(site_config, "install", "run")
    assert code == 8, err[-2000:]  # exitcodes.INSTALL_FAILED: the bundle was rolled back
    assert await _converged(api, site_config, {"2.0.0", "3.0.0"}) == "2.0.0"
    assert "site-3.0.0" in state_of(site_config)["bad_versions"]


@pytest.mark.slow
async def test_crash_loop_rolls_back(site_config: Path, api: Any, bundles: dict[str, Path]) -> None:
    """Killed at the same step on every resume: after MAX_RESUMES the agent stops resuming and rolls back."""
    await _install_in_process(site_config, api, bundles["1.0.0"])
    await _kill_at(site_config, bundles["2.0.0"], "gate:app-b")
    for _ in range(3):
        code, _out, _err = await agent(site_config, "install", "run", env={"EDGEFLEET_FAILPOINT": "gate:app-b"})
        assert code == -signal.SIGKILL
    code, _out, err = await agent(site_config, "install", "run", env={"EDGEFLEET_FAILPOINT": "gate:app-b"})
    assert code == 8, err[-2000:]
    assert await _converged(api, site_config, {"1.0.0", "2.0.0"}) == "1.0.0"
    state = state_of(site_config)
    assert "crash loop" in state["last_run"]["error"] and "site-2.0.0" in state["bad_versions"]
