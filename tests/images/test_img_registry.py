"""Agent side against a real docker-registry, checked with skopeo: push, verify, resume, tamper, missing, GC."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import img_kit
import pytest

from agent import imageload
from agent import images as agent_images
from agent.imageload import registry
from bundles import errors, oci, trust, verify
from bundles import images as bundle_images

pytestmark = pytest.mark.skipif(not img_kit.have_tools(), reason="needs skopeo and docker-registry")


def _stage(tmp: Path, s: img_kit.Signer, src: Path | None, name: str, **kw: object) -> verify.StagedBundle:
    res = s.build(tmp / f"{name}.efb", source=src, **kw)  # type: ignore[arg-type]
    return verify.verify_and_stage(res.path, root=trust.load_root(s.root_path), store_dir=tmp / "store")


def _pushed_refs(reg: img_kit.Registry, staged: verify.StagedBundle) -> list[tuple[str, str, str | None]]:
    meta = bundle_images.load_meta(staged.payload_dir / "images")
    out = []
    for i in meta["images"]:
        ref = bundle_images.parse_ref(i["ref"])
        out.append((f"{reg.host}/{registry.repo_for(ref, 'prefixed')}", i["digest"], ref.tag))
    return out


async def test_push_every_image_then_skopeo_finds_each_by_digest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    made = img_kit.make_source(src)
    s = img_kit.Signer(tmp_path)
    staged = _stage(tmp_path, s, src, "v1")
    with img_kit.registry(tmp_path / "reg") as reg:
        ctx = img_kit.agent_ctx(tmp_path, reg=reg)
        out = await agent_images.load_for(ctx, img_kit.spec_of(staged))
        assert out["pushed"] == 3 and out["skipped"] == 0
        refs = _pushed_refs(reg, staged)
        assert len(refs) == 3
        for repo, digest, tag in refs:
            raw = await asyncio.to_thread(img_kit.skopeo_inspect, f"{repo}@{digest}")
            assert raw["schemaVersion"] == 2
            by_tag = await asyncio.to_thread(img_kit.skopeo_inspect, f"{repo}:{tag}")
            assert by_tag == raw
        # the multi-arch app index: both children there by digest
        app_repo = next(r for r, _d, _t in refs if r.endswith("team/app"))
        for child in ("app-amd64", "app-arm64"):
            await asyncio.to_thread(img_kit.skopeo_inspect, f"{app_repo}@{made[child].digest}")
        # a second load (resume / re-install) uploads nothing
        again = await agent_images.load_for(ctx, img_kit.spec_of(staged))
        assert again["uploaded"] == 0 and again["skipped"] > 0
        assert img_kit.events_of(ctx, "images.pushed")


async def test_tampered_blob_rejected_and_nothing_pushed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src)
    s = img_kit.Signer(tmp_path)
    res = s.build(tmp_path / "v1.efb", source=src)
    raw = bytearray(res.path.read_bytes())
    blob = next(f for f in res.manifest.files if f.path.startswith("images/blobs/") and f.size > 60000)
    at = bytes(raw).find(oci.blob_path(src, "sha256:" + blob.sha256).read_bytes()[:4096])
    raw[at + 777] ^= 0x01
    (tmp_path / "bad.efb").write_bytes(bytes(raw))
    with img_kit.registry(tmp_path / "reg") as reg:
        with pytest.raises(errors.DigestMismatch):
            verify.verify_and_stage(tmp_path / "bad.efb", root=trust.load_root(s.root_path),
                                    store_dir=tmp_path / "store")
        assert list((tmp_path / "store").iterdir()) == []
        assert reg.catalog() == [] and reg.blobs() == set()

        # A blob altered on disk after staging: the registry checks the digest, the image is not pushed.
        staged = verify.verify_and_stage(res.path, root=trust.load_root(s.root_path), store_dir=tmp_path / "store")
        victim = oci.blob_path(staged.payload_dir / "images", "sha256:" + blob.sha256)
        os.chmod(victim, stat.S_IRUSR | stat.S_IWUSR)
        data = bytearray(victim.read_bytes())
        data[10] ^= 1
        victim.write_bytes(bytes(data))
        ctx = img_kit.agent_ctx(tmp_path, reg=reg, retries=2)
        with pytest.raises(agent_images.ImageLoadError, match=f"sha256:{blob.sha256}"):
            await agent_images.load_for(ctx, img_kit.spec_of(staged))
        assert "sha256:" + blob.sha256 not in reg.blobs()
        assert ctx.store.get(imageload.PUSHED_KEY) is None


async def test_missing_image_fails_the_load_naming_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src)
    s = img_kit.Signer(tmp_path)
    bare = _stage(tmp_path, s, None, "bare")  # built without images
    with img_kit.registry(tmp_path / "reg") as reg:
        ctx = img_kit.agent_ctx(tmp_path, reg=reg)
        with pytest.raises(agent_images.ImageLoadError,
                           match=r"component app: image busybox:1.36 is missing: not in bundle demo-1.0.0 "
                                 r"and not in the site registry"):
            await agent_images.load_for(ctx, img_kit.spec_of(bare))
        # once the site registry has them (an earlier bundle pushed them) the same bundle loads
        full = _stage(tmp_path, s, src, "full", release=2)
        await agent_images.load_for(ctx, img_kit.spec_of(full))
        out = await agent_images.load_for(ctx, img_kit.spec_of(bare))
        assert out["pushed"] == 0


async def test_gc_after_upgrade_removes_exactly_the_unreferenced_blobs(tmp_path: Path) -> None:
    s = img_kit.Signer(tmp_path)
    src1, src2 = tmp_path / "src1", tmp_path / "src2"
    img_kit.make_source(src1)
    img_kit.make_source(src2, app_seed=2)  # v2: the app image changed, the others are the same
    v1 = _stage(tmp_path, s, src1, "v1", release=1)
    v2 = _stage(tmp_path, s, src2, "v2", release=2, version="2.0.0")
    with img_kit.registry(tmp_path / "reg") as reg:
        ctx = img_kit.agent_ctx(tmp_path, reg=reg)
        await agent_images.load_for(ctx, img_kit.spec_of(v1))
        await agent_images.load_for(ctx, img_kit.spec_of(v2))
        pushed = ctx.store.get(imageload.PUSHED_KEY)

        def needed(bid: str) -> set[str]:
            return {d for i in pushed[bid] for d in (*i["blobs"], *i["manifests"])}

        n1, n2 = needed(v1.bundle_id), needed(v2.bundle_id)
        assert n1 - n2 and n1 & n2  # some blobs only v1 uses, some shared
        assert reg.blobs() == n1 | n2
        # current + last good are both kept: nothing goes
        report = await agent_images.collect_garbage(ctx, keep={v2.bundle_id, v1.bundle_id})
        assert report == {"manifestsDeleted": 0, "blobsUnreferenced": 0, "gcCommandExit": None}
        assert reg.blobs() == n1 | n2
        # v1 is no longer current nor last good
        report = await agent_images.collect_garbage(ctx, keep={v2.bundle_id, None})
        assert report is not None and report["gcCommandExit"] == 0
        assert report["blobsUnreferenced"] == len(n1 - n2)
        assert reg.blobs() == n2
        for repo, digest, _tag in _pushed_refs(reg, v2):
            await asyncio.to_thread(img_kit.skopeo_inspect, f"{repo}@{digest}")
        ev = img_kit.events_of(ctx, "images.gc")
        assert ev and "manifests deleted" in ev[-1]["summary"]


@pytest.mark.slow
async def test_registry_restart_during_push_resumes_to_a_complete_state(tmp_path: Path) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src, size=6 << 20)
    s = img_kit.Signer(tmp_path)
    staged = _stage(tmp_path, s, src, "v1")
    with img_kit.registry(tmp_path / "reg") as reg:
        ctx = img_kit.agent_ctx(tmp_path, reg=reg, concurrency=1)
        load = asyncio.create_task(agent_images.load_for(ctx, img_kit.spec_of(staged)))
        while len(reg.blobs()) < 2 and not load.done():
            await asyncio.sleep(0.01)
        reg.stop()
        before = reg.blobs()
        await asyncio.sleep(1.5)
        reg.start()
        out = await asyncio.wait_for(load, 120)
        meta = bundle_images.load_meta(staged.payload_dir / "images")
        assert before and out["retries"] >= 1
        layers = {d for i in ctx.store.get(imageload.PUSHED_KEY)[staged.bundle_id] for d in i["blobs"]}
        assert out["uploaded"] == len(layers)  # each blob uploaded once: finished ones kept, shared ones mounted
        assert out["mounted"] >= 1  # the base layer shared by app and busybox
        for repo, digest, tag in _pushed_refs(reg, staged):
            await asyncio.to_thread(img_kit.skopeo_inspect, f"{repo}@{digest}")
            await asyncio.to_thread(img_kit.skopeo_inspect, f"{repo}:{tag}")
        assert {b["digest"] for b in meta["blobs"]} <= reg.blobs()

    # The agent dies mid-push (task cancelled): the next load skips every blob the registry has.
    with img_kit.registry(tmp_path / "reg2") as reg2:
        ctx2 = img_kit.agent_ctx(tmp_path / "b", reg=reg2, concurrency=1)
        load = asyncio.create_task(agent_images.load_for(ctx2, img_kit.spec_of(staged)))
        while len(reg2.blobs()) < 4:
            await asyncio.sleep(0.01)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        have = reg2.blobs()
        out = await agent_images.load_for(ctx2, img_kit.spec_of(staged))
        assert out["skipped"] >= len(have) - 1  # what the registry already had is not uploaded again
        assert out["uploaded"] <= len(layers) - out["skipped"] + 1
        for repo, digest, _tag in _pushed_refs(reg2, staged):
            await asyncio.to_thread(img_kit.skopeo_inspect, f"{repo}@{digest}")


async def test_k3s_airgap_writes_archives_and_imports_with_ctr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src)
    staged = _stage(tmp_path, img_kit.Signer(tmp_path), src, "v1")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "ctr-calls"
    ctr = bin_dir / "ctr"
    names = tmp_path / "ctr-names"
    ctr.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\n'
                   f'case "$*" in *"images ls -q"*) cat {names} 2>/dev/null; exit 0;; esac\n'
                   'last=""; for a in "$@"; do last="$a"; done\n'
                   'tar -tf "$last" | grep -q "^index.json$" || exit 3\n'
                   f'tar -xOf "$last" index.json | grep -o \'"io.containerd.image.name": "[^"]*"\' '
                   f'| sed \'s/.*: "\\(.*\\)"/\\1/\' >> {names}\n')
    ctr.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    images_dir = tmp_path / "k3s-images"
    ctx = img_kit.agent_ctx(tmp_path, loader="k3s-airgap", k3s_images_dir=str(images_dir))
    out = await agent_images.load_for(ctx, img_kit.spec_of(staged))
    assert out["archives"] == 3 and out["written"] == 3 and out["imported"] == 3
    lines = [x for x in calls.read_text().splitlines() if " import " in x]
    assert len(lines) == 3 and all(x.startswith("-n k8s.io images import ") for x in lines)
    assert set(names.read_text().split()) == {"registry.example.com/team/app:1.0", "docker.io/library/busybox:1.36",
                                              "quay.io/acme/widget:2.1"}
    # each archive is a valid OCI layout skopeo can read, named like the pod templates
    for archive in sorted(images_dir.glob("*.tar")):
        proc = await asyncio.create_subprocess_exec("skopeo", "inspect", "--raw", f"oci-archive:{archive}",
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _o, err = await proc.communicate()
        assert proc.returncode == 0, err
    files = {p.name.rsplit("-", 1)[0] for p in images_dir.glob("*.tar")}
    assert len(files) == 3 and any("team_app_1.0" in n for n in files)
    again = await agent_images.load_for(ctx, img_kit.spec_of(staged))
    assert again["written"] == 0  # already there: not rewritten
    # a bundle without images whose images containerd lacks: the load fails naming one
    names.write_text("docker.io/library/busybox:1.36\n")
    bare = _stage(tmp_path, img_kit.Signer(tmp_path), None, "bare", release=2)
    with pytest.raises(agent_images.ImageLoadError,
                       match=r"component app: image registry.example.com/team/app:1.0 is missing: .* containerd"):
        await agent_images.load_for(ctx, img_kit.spec_of(bare))


async def test_build_takes_images_from_a_registry_through_skopeo(tmp_path: Path) -> None:
    src = tmp_path / "src"
    made = img_kit.make_source(src)
    with img_kit.registry(tmp_path / "upstream") as up:
        # the "upstream" registry serves the app image (multi-arch) under its own host name
        app_ref = f"{up.host}/team/app:1.0"
        proc = await asyncio.create_subprocess_exec(
            "skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{src}:{img_kit.APP}",
            f"docker://{app_ref}", stderr=asyncio.subprocess.PIPE)
        _o, err = await proc.communicate()
        assert proc.returncode == 0, err
        s = img_kit.Signer(tmp_path)
        work = tmp_path / "w"
        work.mkdir()
        from bundles import build

        prof = img_kit.profile(work, app_image=app_ref)
        opts = bundle_images.Options(source="registry", arches=("arm64",), registry_tls_verify=False)
        with pytest.raises(errors.BuildError, match=r"image busybox:1.36: cannot fetch from its registry"):
            build.build(profile=prof, platform=work / "platform", mirror=None, out=tmp_path / "r.efb",
                        version="1.0.0", release=1, keys=[s.key], images=opts)
        # only the app image is fetched from the registry: a profile using just it
        prof.write_text(prof.read_text().replace("busybox:1.36", app_ref).replace(img_kit.WIDGET, app_ref))
        res = build.build(profile=prof, platform=work / "platform", mirror=None, out=tmp_path / "r.efb",
                          version="1.0.0", release=1, keys=[s.key], images=opts)
        staged = verify.verify_and_stage(res.path, root=trust.load_root(s.root_path), store_dir=tmp_path / "st")
        meta = bundle_images.load_meta(staged.payload_dir / "images")
        assert [i["ref"] for i in meta["images"]] == [app_ref]
        assert meta["images"][0]["sourceDigest"] == made["app"].digest  # tag resolved to the upstream digest
        assert made["app-arm64"].digest in meta["images"][0]["blobs"]
        assert made["app-amd64"].digest not in meta["images"][0]["blobs"]


async def test_push_memory_is_bounded_whatever_the_layer_size(tmp_path: Path) -> None:
    import tracemalloc

    layout = tmp_path / "layout"
    oci.add_image(layout, layers=[img_kit.layer(7, 48 << 20)], ref="quay.io/big/one:1")
    meta = {"schemaVersion": 1, "images": [
        {"ref": "quay.io/big/one:1", **{k: v for k, v in oci.read_index(layout)[0].to_json().items()
                                        if k in ("digest", "size")}, "mediaType": oci.MT_MANIFEST}]}
    (layout / bundle_images.META_NAME).write_text(__import__("json").dumps(meta))
    with img_kit.registry(tmp_path / "reg") as reg:
        tracemalloc.start()
        try:
            report = await registry.push(registry.Target(url=reg.url), layout)
            _cur, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert report.bytes_uploaded > 48 << 20
        assert peak < 8 << 20, f"push held {peak >> 20} MiB for a 48 MiB layer"
