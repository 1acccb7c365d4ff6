"""The full IDP profile bundle (built by `bundles` from ../shared/platform) on a 3-node sim."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from install_kit import Keys, context, make_trust, managed, write_config

from agent import installer, intake, kube, sitestatus
from agent.install import journal, model
from bundles import build
from bundles.manifest import parse_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def idp_bundle(tmp_path_factory: pytest.TempPathFactory, platform: Path) -> tuple[Path, Keys]:
    """Built once per session, with throwaway keys."""
    tmp = tmp_path_factory.mktemp("idp")
    k = make_trust(tmp / "trust")
    result = build.build(
        profile=build.DEFAULT_PROFILE, platform=platform / "idp-blueprint", mirror=platform / "mirror",
        out=tmp / "idp.bundle", version="1.0.0", release=1, keys=[k.private], allow_unrendered=True,
        created=datetime.now(UTC) - timedelta(minutes=5),
    )
    return result.path, k


async def test_full_bundle_fresh_install(idp_bundle: tuple[Path, Keys], tmp_path: Path) -> None:
    import sim.testing

    bundle, k = idp_bundle
    trust_dir = k.root_path.parent
    async with sim.testing.running(nodes=["server-0", "agent-0", "agent-1"], speed=20) as site:
        config = write_config(tmp_path / "agent.yaml", state_dir=tmp_path / "state", trust_dir=trust_dir,
                              kubeconfig=site.kubeconfig, default_gate_timeout_seconds=300)
        ctx = context(config)
        async with kube.connect(site.kubeconfig) as api:
            await intake.import_bundle(ctx, bundle)
            run = await installer.run_pending(ctx, api)
            assert run is not None and run.state == "committed", run and run.error
            rec = journal.current(ctx.store)
            assert rec is not None
            manifest = parse_manifest(rec.manifest.encode())
            rendered = [c.name for c in manifest.components if c.rendered and c.files]
            assert len(rendered) >= 15
            done = {e["step"] for e in journal.entries(ctx.store, run.id) if e["phase"] == "done"}
            assert {f"gate:{name}" for name in rendered} <= done  # every gate passed
            status = ctx.store.get(sitestatus.INSTALL_KEY)
            assert status["healthy"], [c for c in status["components"] if not c["healthy"]]
            assert {s["name"] for s in status["skipped"]} == {c.name for c in manifest.components
                                                             if not (c.rendered and c.files)}
            spec = await installer.spec_for(ctx, rec)
            kinds = {k for u in spec.units for k in u.kinds}
            live = await managed(api, kinds)
            assert set(live) == set(spec.refs())
            labels = {o["metadata"]["labels"][model.LABEL_BUNDLE] for o in live.values()}
            assert labels == {"idp-platform-1.0.0"}
            pods = await kube.list_objects(api, "v1", "Pod", label_selector=model.LABEL_COMPONENT)
            assert pods and {p["spec"].get("nodeName") for p in pods} >= {"agent-0", "agent-1"}
        ctx.store.close()


