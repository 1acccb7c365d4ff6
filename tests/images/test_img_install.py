"""Images in a real install run against the sim: pushed before anything is applied, missing → rollback, GC."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import img_kit
import pytest

from agent import installer, intake, kube
from agent.install import journal
from bundles import images as bundle_images

pytestmark = pytest.mark.skipif(not img_kit.have_tools(), reason="needs skopeo and docker-registry")


@pytest.fixture
async def site() -> AsyncIterator[Any]:
    import sim.testing

    async with sim.testing.running(speed=20) as s:
        yield s


async def _install(ctx: Any, api: Any, bundle: Path) -> journal.Run:
    await intake.import_bundle(ctx, bundle)
    run = await installer.run_pending(ctx, api)
    assert run is not None
    return run


async def _deployments(api: Any) -> set[str]:
    items = await kube.list_objects(api, "apps/v1", "Deployment",
                                    label_selector="app.kubernetes.io/managed-by=edgefleet")
    return {i["metadata"]["name"] for i in items}


async def test_images_pushed_before_apply_and_missing_image_rolls_back(tmp_path: Path, site: Any) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src)
    s = img_kit.Signer(tmp_path)
    bare = s.build(tmp_path / "bare.efb", source=None, release=1)
    full = s.build(tmp_path / "full.efb", source=src, release=2, version="2.0.0")
    with img_kit.registry(tmp_path / "reg") as reg:
        ctx = img_kit.agent_ctx(tmp_path, reg=reg, kubeconfig=Path(site.kubeconfig))
        async with kube.connect(site.kubeconfig) as api:
            # built without images, and the site registry has none: refused before anything is applied
            run = await _install(ctx, api, bare.path)
            assert run.state == "rolled-back"
            assert "image busybox:1.36 is missing" in (run.error or "")
            assert await _deployments(api) == set()
            # the full bundle: images pushed in `prepare`, then the components go in
            run = await _install(ctx, api, full.path)
            assert run.state == "committed", run.error
            steps = [e["step"] for e in journal.entries(ctx.store, run.id) if e["phase"] == "done"]
            assert steps[0] == "prepare" and any(x.startswith("apply:") for x in steps[1:])
            assert await _deployments(api) == {"app", "helper"}
            staged = Path(journal.current(ctx.store).path)  # type: ignore[union-attr]
            for i in bundle_images.load_meta(staged / "payload" / "images")["images"]:
                ref = bundle_images.parse_ref(i["ref"])
                await asyncio.to_thread(img_kit.skopeo_inspect,
                                        f"{reg.host}/{ref.registry}/{ref.repository}@{i['digest']}")


@pytest.mark.slow
async def test_upgrades_keep_current_and_last_good_images_only(tmp_path: Path, site: Any) -> None:
    s = img_kit.Signer(tmp_path)
    builds = []
    for n in (1, 2, 3):
        src = tmp_path / f"src{n}"
        img_kit.make_source(src, app_seed=n)
        builds.append(s.build(tmp_path / f"v{n}.efb", source=src, release=n, version=f"{n}.0.0"))
    with img_kit.registry(tmp_path / "reg") as reg:
        ctx = img_kit.agent_ctx(tmp_path, reg=reg, kubeconfig=Path(site.kubeconfig))
        async with kube.connect(site.kubeconfig) as api:
            ids = []
            for b in builds:
                run = await _install(ctx, api, b.path)
                assert run.state == "committed", run.error
                ids.append(run.bundle_id)
            pushed = ctx.store.get("images.pushed")
            assert set(pushed) == {ids[1], ids[2]}  # v1 forgotten after v3 committed

            def needed(imgs: list[dict[str, Any]]) -> set[str]:
                return {d for i in imgs for d in (*i["blobs"], *i["manifests"])}

            assert reg.blobs() == needed(pushed[ids[1]]) | needed(pushed[ids[2]])
            gc_events = img_kit.events_of(ctx, "images.gc")
            assert len(gc_events) == 1 and gc_events[0]["data"]["manifestsDeleted"] >= 1



def test_none_loader_without_images_loads_no_image_tooling(tmp_path: Path) -> None:
    """The sim's ``none`` loader on a bundle without images: nothing to do, and the loaders' modules
    (tarfile, OCI, registry client: ~0.6 MiB for the daemon's life) stay unimported."""
    probe = r"""
import asyncio, sys
from pathlib import Path
from agent import images
from agent.config import AgentConfig
from agent.context import AgentContext
from agent.install import model
from agent.state import StateStore
tmp = Path(sys.argv[1])
(tmp / "bundle" / "payload").mkdir(parents=True)
cfg = AgentConfig(site_id="s", state_dir=tmp / "state", install={"image_loader": "none"})
ctx = AgentContext(config=cfg, store=StateStore.open(cfg.state_dir))
spec = model.Spec(bundle_id="b", name="demo", version="1", release=1, created="", path=str(tmp / "bundle"), units=[])
print(asyncio.run(images.load_for(ctx, spec)))
print(sorted(m for m in ("agent.imageload", "tarfile", "bundles.oci") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["{'references': 0, 'loader': 'none'}", "[]"]
