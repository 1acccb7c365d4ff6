"""The install engine against the sim: install, upgrade + prune, gate failure → rollback, refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from install_kit import Comp, Keys, build_bundle, context, events, managed, site_bad, site_v1, site_v2, which_bundle

from agent import installer, intake, kube, sitestatus
from agent.install import inventory, journal, model
from bundles import errors

VERSIONS = {"1.0.0": site_v1(), "2.0.0": site_v2(), "3.0.0": site_bad()}


async def install(ctx: Any, api: Any, bundle: Path) -> journal.Run:
    await intake.import_bundle(ctx, bundle)
    run = await installer.run_pending(ctx, api)
    assert run is not None
    return run


async def test_fresh_install_every_gate_passes(site_config: Path, api: Any, bundles: dict[str, Path]) -> None:
    ctx = context(site_config)
    run = await install(ctx, api, bundles["1.0.0"])
    assert run.state == "committed", run.error
    assert await which_bundle(api, VERSIONS) == "1.0.0"
    done = {e["step"] for e in journal.entries(ctx.store, run.id) if e["phase"] == "done"}
    names = [c.name for c in site_v1()]
    assert {f"gate:{n}" for n in names} <= done and {"prepare", "prune", "commit"} <= done
    status = ctx.store.get(sitestatus.INSTALL_KEY)
    assert status["bundle"] == {"name": "site", "version": "1.0.0", "release": 1}
    assert status["install_state"] == "idle" and status["healthy"]
    assert sorted(c["name"] for c in status["components"]) == sorted(names)
    assert all(c["healthy"] for c in status["components"])
    assert journal.highwater(ctx.store)[0] == 1
    refs = await inventory.read(api, bundle_name="site", release=1)
    assert refs is not None and set(refs) == set(journal.load_inventory(ctx.store, run.bundle_id))
    web = (await managed(api))["apps/Deployment/demo-a/web"]
    assert web["metadata"]["labels"][model.LABEL_COMPONENT] == "app-a"
    assert any(m["manager"] == "edgefleet" and m["operation"] == "Apply" for m in web["metadata"]["managedFields"])
    assert [e["type"] for e in events(ctx.store)][-2:] == ["install.started", "install.committed"]
    assert await installer.run_pending(ctx, api) is None  # nothing left to do


async def test_upgrade_changes_and_prunes(
    site_config: Path, api: Any, bundles: dict[str, Path], trust_keys: Keys, tmp_path: Path
) -> None:
    ctx = context(site_config)
    assert (await install(ctx, api, bundles["1.0.0"])).state == "committed"
    run = await install(ctx, api, bundles["2.0.0"])
    assert run.state == "committed", run.error
    assert await which_bundle(api, VERSIONS) == "2.0.0"
    live = await managed(api)
    assert "/Service/demo-a/web" not in live and "apps/Deployment/demo-a/ui" not in live
    assert live["/ConfigMap/demo-a/app-a-config"]["data"] == {"mode": "two", "level": "2"}
    # A dropped Namespace is retained (deleting it would delete everything in it), unlabelled.
    ns = await kube.get(api, "v1", "Namespace", "demo-old")
    assert ns is not None and ns["metadata"]["labels"][model.LABEL_RETAINED] == "site-1.0.0"
    assert model.LABEL_MANAGED_BY not in ns["metadata"]["labels"]
    [retained] = events(ctx.store, "install.retained")
    assert retained["data"]["objects"] == ["Namespace/demo-old"]
    # A/B: the last good bundle stays staged and its inventory stays in the cluster.
    report = installer.report(ctx.store)
    assert report["current"] == "site-2.0.0" and report["last_good"] == "site-1.0.0"
    assert len(journal.all_bundles(ctx.store)) == 2
    assert await inventory.read(api, bundle_name="site", release=1) is not None
    # One more upgrade: only current + last good stay, in the store and in the cluster.
    v21 = build_bundle(tmp_path / "v21.bundle", k=trust_keys, comps=site_v2(), version="2.1.0", release=4)
    run = await install(ctx, api, v21)
    assert run.state == "committed"
    assert await which_bundle(api, {**VERSIONS, "2.1.0": site_v2()}) == "2.1.0"
    assert sorted(b.bundle for b in journal.all_bundles(ctx.store)) == ["site-2.0.0", "site-2.1.0"]
    assert await inventory.read(api, bundle_name="site", release=1) is None
    assert await inventory.read(api, bundle_name="site", release=2) is not None
    # Re-importing the current bundle re-applies it (a repair), and nothing is pruned.
    run = await install(ctx, api, v21)
    assert run.state == "committed"
    assert await which_bundle(api, {"2.1.0": site_v2()}) == "2.1.0"


async def test_gate_failure_rolls_back_and_marks_bad(site_config: Path, api: Any, bundles: dict[str, Path]) -> None:
    ctx = context(site_config)
    assert (await install(ctx, api, bundles["2.0.0"])).state == "committed"
    run = await install(ctx, api, bundles["3.0.0"])
    assert run.state == "rolled-back"
    assert "broken" in run.error and "timed out" in run.error
    assert await which_bundle(api, VERSIONS) == "2.0.0"
    assert "site-3.0.0" in journal.bad_versions(ctx.store)
    report = installer.report(ctx.store)
    assert report["current"] == "site-2.0.0" and report["run"] is None
    assert journal.highwater(ctx.store)[0] == 2  # not raised by a bundle that never committed
    kinds = [e["type"] for e in events(ctx.store)]
    assert kinds[-3:] == ["install.started", "install.failed", "install.rolled_back"]
    assert await installer.run_pending(ctx, api) is None  # not retried by itself
    assert await inventory.read(api, bundle_name="site", release=3) is None
    ns = await kube.get(api, "v1", "Namespace", "demo-bad")  # created by the failed bundle: removed
    assert ns is None or ns.get("status", {}).get("phase") == "Terminating"
    # An explicit re-import clears the mark (and fails again, honestly).
    result = await intake.import_bundle(ctx, bundles["3.0.0"])
    assert result.cleared_bad


async def test_failed_first_install_leaves_cluster_empty(
    site_config: Path, api: Any, bundles: dict[str, Path]
) -> None:
    ctx = context(site_config)
    run = await install(ctx, api, bundles["3.0.0"])
    assert run.state == "rolled-back"
    left = await managed(api)
    # Deletion was issued for everything; a Namespace finalizes asynchronously (its pods terminate first).
    assert all(o["metadata"].get("deletionTimestamp") for o in left.values()), sorted(left)
    for _ in range(60):
        if not left:
            break
        await asyncio.sleep(0.5)
        left = await managed(api)
    assert left == {}
    assert journal.current(ctx.store) is None
    status = ctx.store.get(sitestatus.INSTALL_KEY)
    assert status["bundle"] is None and not status["healthy"]


async def test_rolled_back_and_tampered_bundles_change_nothing(
    site_config: Path, api: Any, bundles: dict[str, Path], tmp_path: Path
) -> None:
    ctx = context(site_config)
    assert (await install(ctx, api, bundles["2.0.0"])).state == "committed"
    before = {k: o["metadata"]["resourceVersion"] for k, o in (await managed(api)).items()}
    with pytest.raises(errors.ReleaseRollback):
        await intake.import_bundle(ctx, bundles["1.0.0"])
    data = bytearray(bundles["3.0.0"].read_bytes())
    data[len(data) // 3] ^= 0x10
    (tmp_path / "tampered.bundle").write_bytes(bytes(data))
    with pytest.raises(errors.BundleError):
        await intake.import_bundle(ctx, tmp_path / "tampered.bundle")
    assert await installer.run_pending(ctx, api) is None
    after = {k: o["metadata"]["resourceVersion"] for k, o in (await managed(api)).items()}
    assert after == before
    assert [e["data"]["reason"] for e in events(ctx.store, "bundle.rejected")][0] == "release-rollback"


async def test_commanded_rollback_returns_to_last_good(site_config: Path, api: Any, bundles: dict[str, Path]) -> None:
    ctx = context(site_config)
    await install(ctx, api, bundles["1.0.0"])
    await install(ctx, api, bundles["2.0.0"])
    result = await intake.rollback(ctx)
    assert result["bundle"] == "site-1.0.0"
    run = await installer.run_pending(ctx, api)
    assert run is not None and run.state == "committed"
    assert await which_bundle(api, VERSIONS) == "1.0.0"
    assert installer.report(ctx.store)["current"] == "site-1.0.0"


async def test_components_apply_apply_parallelism_at_once_and_wait_at_gates_together(
    tmp_path: Path, site: Any, api: Any, trust_keys: Keys
) -> None:
    """Four independent components, ``parallelism: 4``, ``apply_parallelism: 1``: the journal shows
    no two apply steps open at once, and gates that overlap (they hold no documents in memory)."""
    from install_kit import _deploy, write_config

    comps = [Comp("ns", 0, 1, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "par"}}])]
    comps += [Comp(f"c{i}", 1, 2, [_deploy(f"w{i}", None, replicas=2)], namespace="par") for i in range(4)]
    bundle = build_bundle(tmp_path / "par.bundle", k=trust_keys, comps=comps, version="1.0.0", release=1)
    config = write_config(tmp_path / "agent.yaml", state_dir=tmp_path / "state", trust_dir=tmp_path / "trust",
                          kubeconfig=site.kubeconfig, apply_parallelism=1)
    ctx = context(config)
    run = await install(ctx, api, bundle)
    assert run.state == "committed", run.error
    open_applies: set[str] = set()
    open_gates: set[str] = set()
    most_gates = 0
    for entry in journal.entries(ctx.store, run.id):
        kind, _, name = entry["step"].partition(":")
        opened = open_applies if kind == "apply" else open_gates if kind == "gate" else None
        if opened is None:
            continue
        if entry["phase"] == "begin":
            opened.add(name)
            assert len(open_applies) <= 1, f"applying at once: {sorted(open_applies)}"
            most_gates = max(most_gates, len(open_gates))
        else:
            opened.discard(name)
    assert most_gates >= 2, "gates of independent components should wait together"
