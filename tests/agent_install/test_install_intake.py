"""Bundle intake without a cluster: verification, queueing, rejection, the inbox, the plan."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from install_kit import Keys, build_bundle, context, events, run_agent, site_v1

from agent import intake, sitestatus, verifyproc
from agent.install import journal, model, source
from bundles import errors


async def test_import_verifies_stages_and_queues(tmp_path: Path, trust_keys: Keys, agent_config: Path) -> None:
    bundle = build_bundle(tmp_path / "v1.bundle", k=trust_keys, comps=site_v1(), version="1.0.0", release=1)
    ctx = context(agent_config)
    result = await intake.import_bundle(ctx, bundle)
    assert result.bundle == "site-1.0.0"
    run = journal.active_run(ctx.store)
    assert run is not None and run.state == "staged" and run.bundle_id == result.bundle_id
    rec = journal.get_bundle(ctx.store, result.bundle_id)
    assert rec is not None and Path(rec.path, "manifest.json").is_file()
    assert [e["type"] for e in events(ctx.store)] == ["bundle.accepted"]
    assert ctx.store.get(sitestatus.INSTALL_KEY)["install_state"] == "staged"
    # Nothing committed yet: no high-water mark.
    assert journal.highwater(ctx.store) == (0, None)


async def test_tampered_bundle_rejected_and_nothing_changes(
    tmp_path: Path, trust_keys: Keys, agent_config: Path
) -> None:
    bundle = build_bundle(tmp_path / "v1.bundle", k=trust_keys, comps=site_v1(), version="1.0.0", release=1)
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "tampered.bundle"
    bad.write_bytes(bytes(data))
    ctx = context(agent_config)
    with pytest.raises(errors.BundleError) as info:
        await intake.import_bundle(ctx, bad)
    assert journal.active_run(ctx.store) is None
    assert journal.all_bundles(ctx.store) == []
    store_dir = intake.store_dir(ctx)
    assert not store_dir.exists() or [p for p in store_dir.iterdir() if not p.name.startswith(".")] == []
    rejected = events(ctx.store, "bundle.rejected")
    assert len(rejected) == 1 and rejected[0]["data"]["reason"] == info.value.reason


async def test_a_killed_verifier_rejects_and_changes_nothing(
    tmp_path: Path, trust_keys: Keys, agent_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Verification runs in a child (agent.verifyproc): one that dies answers nothing, so the bundle
    # is refused, and a staging directory a dead child may leave is swept.
    bundle = build_bundle(tmp_path / "v1.bundle", k=trust_keys, comps=site_v1(), version="1.0.0", release=1)
    ctx = context(agent_config)
    leftover = intake.store_dir(ctx) / ".staging-leftover"
    leftover.mkdir(parents=True)
    monkeypatch.setenv("EDGEFLEET_FAILPOINT", "verifier:bundle")
    with pytest.raises(verifyproc.VerifierFailed) as info:
        await intake.import_bundle(ctx, bundle)
    assert "SIGKILL" in info.value.message
    assert journal.active_run(ctx.store) is None and journal.all_bundles(ctx.store) == []
    assert not leftover.exists()
    assert [e["data"]["reason"] for e in events(ctx.store, "bundle.rejected")] == ["verifier-failed"]
    monkeypatch.delenv("EDGEFLEET_FAILPOINT")
    assert (await intake.import_bundle(ctx, bundle)).bundle == "site-1.0.0"


def test_verification_keeps_cryptography_out_of_the_agent(tmp_path: Path, trust_keys: Keys, agent_config: Path) -> None:
    # The point of the verifier child: the agent process never loads cryptography (~8 MiB it
    # would keep for life). A fresh interpreter, since this test process has it loaded already.
    bundle = build_bundle(tmp_path / "v1.bundle", k=trust_keys, comps=site_v1(), version="1.0.0", release=1)
    code = f"""
import asyncio, sys
from pathlib import Path
from agent import config, intake, outbox
from agent.context import AgentContext
from agent.install import journal
from agent.state import StateStore
cfg = config.load(Path({str(agent_config)!r}))
store = StateStore.open(cfg.state_dir)
outbox.setup(store)
journal.setup(store)
print(asyncio.run(intake.import_bundle(AgentContext(config=cfg, store=store), Path({str(bundle)!r}))).bundle)
crypto = ("cryptography", "bundles.verify", "bundles.trust", "bundles.dsse")
print(sorted(m for m in sys.modules if m.startswith(crypto)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.splitlines()[-2:] == ["site-1.0.0", "[]"]


async def test_other_signer_rejected(tmp_path: Path, trust_keys: Keys, agent_config: Path) -> None:
    from install_kit import make_trust

    stranger = make_trust(tmp_path / "other-trust")
    bundle = build_bundle(tmp_path / "v1.bundle", k=stranger, comps=site_v1(), version="1.0.0", release=1)
    ctx = context(agent_config)
    with pytest.raises(errors.UnknownKey):
        await intake.import_bundle(ctx, bundle)
    assert journal.active_run(ctx.store) is None


def test_cli_exit_codes(tmp_path: Path, trust_keys: Keys, agent_config: Path) -> None:
    bundle = build_bundle(tmp_path / "v1.bundle", k=trust_keys, comps=site_v1(), version="1.0.0", release=1)
    data = bytearray(bundle.read_bytes())
    data[-2000] ^= 0x01
    (tmp_path / "bad.bundle").write_bytes(bytes(data))
    proc = run_agent(agent_config, "bundle", "import", str(tmp_path / "bad.bundle"))
    assert proc.returncode >= 10, proc.stderr
    assert proc.stderr.count("\n") == 1 and "bad.bundle" in proc.stderr
    proc = run_agent(agent_config, "bundle", "import", str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert "site-1.0.0 verified and queued" in proc.stdout
    proc = run_agent(agent_config, "install", "status", "--json")
    assert proc.returncode == 0 and '"install_state": "staged"' in proc.stdout


async def test_inbox_moves_files_never_deletes(tmp_path: Path, trust_keys: Keys, agent_config: Path) -> None:
    ctx = context(agent_config)
    inbox = ctx.config.inbox
    inbox.mkdir(parents=True)
    good = build_bundle(inbox / "good.bundle", k=trust_keys, comps=site_v1(), version="1.0.0", release=1)
    (inbox / "junk.bundle").write_bytes(b"not a bundle at all")
    (inbox / "copying.bundle.part").write_bytes(b"...")
    old = time.time() - 10
    for p in inbox.iterdir():
        os.utime(p, (old, old))
    (inbox / "fresh.bundle").write_bytes(b"still being copied")  # not settled: left alone
    results = await intake.import_inbox(ctx)
    assert len(results) == 2
    assert sorted(p.name for p in (inbox / "done").iterdir())[0].endswith("-good.bundle")
    rejected = sorted(p.name for p in (inbox / "rejected").iterdir())
    assert any(n.endswith("-junk.bundle") for n in rejected) and any(n.endswith(".reason") for n in rejected)
    assert (inbox / "copying.bundle.part").exists() and (inbox / "fresh.bundle").exists()
    assert not good.exists()
    assert journal.active_run(ctx.store) is not None


async def test_inbox_refuses_bad_version_but_explicit_import_retries(
    tmp_path: Path, trust_keys: Keys, agent_config: Path
) -> None:
    ctx = context(agent_config)
    bundle = build_bundle(tmp_path / "v1.bundle", k=trust_keys, comps=site_v1(), version="1.0.0", release=1)
    result = await intake.import_bundle(ctx, bundle)
    rec = journal.get_bundle(ctx.store, result.bundle_id)
    assert rec is not None
    journal.mark_bad(ctx.store, rec, "gate timed out")
    inbox = ctx.config.inbox
    inbox.mkdir(parents=True)
    copy = inbox / "again.bundle"
    copy.write_bytes(bundle.read_bytes())
    os.utime(copy, (time.time() - 10, time.time() - 10))
    [(path, outcome)] = await intake.import_inbox(ctx)
    assert isinstance(outcome, intake.MarkedBad) and path.parent.name == "rejected"
    again = await intake.import_bundle(ctx, bundle)  # explicit
    assert again.cleared_bad and journal.bad_reason(ctx.store, "site-1.0.0") is None


async def test_spec_renders_labels_namespaces_and_policy(tmp_path: Path, trust_keys: Keys, agent_config: Path) -> None:
    ctx = context(agent_config)
    result = await intake.import_bundle(ctx, build_bundle(tmp_path / "b", k=trust_keys, comps=site_v1(),
                                                          version="1.0.0", release=1))
    rec = journal.get_bundle(ctx.store, result.bundle_id)
    assert rec is not None
    spec = source.load_spec(manifest_json=rec.manifest, bundle_id=rec.bundle_id, path=rec.path, default_timeout=60)
    web = spec.objects()["apps/Deployment/demo-a/web"]
    labels = web["metadata"]["labels"]
    assert labels[model.LABEL_MANAGED_BY] == "edgefleet" and labels[model.LABEL_BUNDLE] == "site-1.0.0"
    assert labels[model.LABEL_LAYER] == "1" and labels[model.LABEL_TIER] == "2"
    tmpl = web["spec"]["template"]["metadata"]["labels"]
    assert tmpl[model.LABEL_COMPONENT] == "app-a" and tmpl[model.LABEL_TIER] == "2" and tmpl["app"] == "web"
    pod = web["spec"]["template"]["spec"]
    assert any(t.get("key") == "node-role.kubernetes.io/control-plane" for t in pod["tolerations"])
    assert "podAntiAffinity" in pod["affinity"]
    assert "example.com/Widget/demo-b/gizmo" in spec.objects()  # CR namespaced via the bundle's own CRD
    assert "apiextensions.k8s.io/CustomResourceDefinition//widgets.example.com" in spec.objects()
    assert [[u.name for u in layer] for layer in spec.layers()] == [
        ["base", "crds"], ["app-a", "app-b"], ["node-agent"], ["ui"], []]


def test_dependency_cycle_is_refused() -> None:
    # The manifest schema refuses cycles already; the engine re-checks the plan it will run.
    units = [
        model.Unit(name="a", layer=0, tier=1, namespace="x", depends_on=("b",), gate_timeout=1),
        model.Unit(name="b", layer=0, tier=1, namespace="x", depends_on=("a",), gate_timeout=1),
    ]
    spec = model.Spec(bundle_id="x", name="s", version="1.0.0", release=1, created="", path="", units=units)
    with pytest.raises(source.SpecError, match="cycle"):
        source.check_dag(spec)
    units[0].depends_on = ()
    units[1].layer = 1
    units[0].depends_on = ("b",)  # a (layer 0) waiting on b (layer 1) could never start
    with pytest.raises(source.SpecError, match="later layer"):
        source.check_dag(spec)


async def test_incompatible_kubernetes_version_rejected(
    tmp_path: Path, trust_keys: Keys, agent_config: Path
) -> None:
    ctx = context(agent_config)
    ctx.store.put(intake.KUBE_VERSION_KEY, "v1.20.4+k3s1")  # as the installer last saw the cluster
    bundle = build_bundle(tmp_path / "v1.bundle", k=trust_keys, comps=site_v1(), version="1.0.0", release=1)
    with pytest.raises(errors.Incompatible):
        await intake.import_bundle(ctx, bundle)
    assert journal.active_run(ctx.store) is None
    ctx.store.put(intake.KUBE_VERSION_KEY, "v1.31.2+k3s1")
    assert (await intake.import_bundle(ctx, bundle)).bundle == "site-1.0.0"
