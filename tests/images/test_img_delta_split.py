"""Delta bundles (base recorded, refused without it, installable with it) and split parts."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import img_kit
import pytest

from agent import images as agent_images
from bundles import cli, delta, errors, oci, split, trust, verify
from bundles import images as bundle_images


def _versions(tmp: Path, *, size: int = 256 * 1024) -> tuple[img_kit.Signer, Path, Path]:
    src1, src2 = tmp / "src1", tmp / "src2"
    img_kit.make_source(src1, size=size)
    img_kit.make_source(src2, size=size, app_seed=2)  # one image changed
    return img_kit.Signer(tmp), src1, src2


def test_delta_is_much_smaller_records_its_base_and_needs_it(tmp_path: Path) -> None:
    s, src1, src2 = _versions(tmp_path)
    v1 = s.build(tmp_path / "v1.efb", source=src1, release=1)
    full2 = s.build(tmp_path / "full2.efb", source=src2, release=2, version="2.0.0")
    d2 = s.build(tmp_path / "d2.efb", source=src2, release=2, version="2.0.0", base=v1.path)
    assert d2.manifest.base is not None
    assert (d2.manifest.base.name, d2.manifest.base.version, d2.manifest.base.release) == ("demo", "1.0.0", 1)
    assert d2.path.stat().st_size < 0.6 * full2.path.stat().st_size
    root = trust.load_root(s.root_path)

    # a site without the base refuses, naming the bundle it needs; nothing is staged
    bare = tmp_path / "bare-store"
    with pytest.raises(errors.BaseMissing, match=r"needs its base bundle demo-1\.0\.0 \(release 1\)"):
        verify.verify_and_stage(d2.path, root=root, store_dir=bare)
    assert list(bare.iterdir()) == []
    code = cli.main(["verify", str(d2.path), "--root", str(s.root_path), "--store", str(bare)])
    assert code == errors.BaseMissing.exit_code

    # a site with the base: staged, completed from the base, and identical to the full bundle's images
    store = tmp_path / "store"
    verify.verify_and_stage(v1.path, root=root, store_dir=store)
    staged = verify.verify_and_stage(d2.path, root=root, store_dir=store)
    meta = bundle_images.load_meta(staged.payload_dir / "images")
    assert meta["base"]["blobs"]
    # staging linked the base's blobs in: the staged delta is self-contained, even once the base is gone
    assert delta.complete(staged.path, store) == 0
    shutil.rmtree(store / verify.verify_only(v1.path, root=root).bundle_id)
    for b in meta["blobs"]:
        oci.verify_blob(oci.blob_path(staged.payload_dir / "images", b["digest"]), b["digest"], b["size"])
    verify.recheck_staged(staged.path)
    full_staged = verify.verify_and_stage(full2.path, root=root, store_dir=tmp_path / "store-full")
    assert bundle_images.load_meta(full_staged.payload_dir / "images")["images"] == meta["images"]


@pytest.mark.skipif(not img_kit.have_tools(), reason="needs skopeo and docker-registry")
async def test_delta_installs_on_a_site_with_its_base(tmp_path: Path) -> None:
    s, src1, src2 = _versions(tmp_path, size=64 * 1024)
    v1 = s.build(tmp_path / "v1.efb", source=src1, release=1)
    d2 = s.build(tmp_path / "d2.efb", source=src2, release=2, version="2.0.0", base=v1.path)
    root = trust.load_root(s.root_path)
    store = tmp_path / "store"
    s1 = verify.verify_and_stage(v1.path, root=root, store_dir=store)
    s2 = verify.verify_and_stage(d2.path, root=root, store_dir=store)
    with img_kit.registry(tmp_path / "reg") as reg:
        ctx = img_kit.agent_ctx(tmp_path, reg=reg)
        await agent_images.load_for(ctx, img_kit.spec_of(s1))
        out = await agent_images.load_for(ctx, img_kit.spec_of(s2))
        assert out["fromBase"] == 0 and out["pushed"] == 3  # the base's blobs were linked in at staging
        assert bundle_images.load_meta(s2.payload_dir / "images")["base"]["blobs"]
        for i in bundle_images.load_meta(s2.payload_dir / "images")["images"]:
            ref = bundle_images.parse_ref(i["ref"])
            await asyncio.to_thread(img_kit.skopeo_inspect, f"{reg.host}/{ref.registry}/{ref.repository}@{i['digest']}")


def _split_bundle(tmp: Path) -> tuple[img_kit.Signer, Path, bytes, list[Path]]:
    src = tmp / "src"
    img_kit.make_source(src, size=200 * 1024)
    s = img_kit.Signer(tmp)
    res = s.build(tmp / "b.efb", source=src)
    whole = res.path.read_bytes()
    parts = split.split(res.path, max_part_size=256 * 1024)
    return s, res.path, whole, parts


def test_split_round_trip(tmp_path: Path) -> None:
    s, index, whole, parts = _split_bundle(tmp_path)
    assert parts[0] == index and len(parts) > 3
    assert all(p.stat().st_size <= 256 * 1024 for p in parts[1:])
    assert b"".join(p.read_bytes() for p in parts[1:]) == whole
    assert json.loads(index.read_text())["kind"] == split.KIND
    staged = verify.verify_and_stage(index, root=trust.load_root(s.root_path), store_dir=tmp_path / "store")
    assert len(bundle_images.load_meta(staged.payload_dir / "images")["images"]) == 3
    assert cli.main(["verify", str(index), "--root", str(s.root_path)]) == 0


def test_split_missing_part_is_named(tmp_path: Path) -> None:
    s, index, _whole, parts = _split_bundle(tmp_path)
    parts[2].unlink()
    with pytest.raises(errors.PartMissing, match=rf"part 2 of {len(parts) - 1} \({parts[2].name}\) .* is missing"):
        verify.verify_only(index, root=trust.load_root(s.root_path))
    assert cli.main(["verify", str(index), "--root", str(s.root_path), "--store", str(tmp_path / "st")]) == \
        errors.PartMissing.exit_code
    assert list((tmp_path / "st").iterdir()) == []


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_split_damaged_part_is_named(tmp_path: Path, how: str) -> None:
    s, index, _whole, parts = _split_bundle(tmp_path)
    victim = parts[3]
    data = bytearray(victim.read_bytes())
    if how == "flip":
        data[1000] ^= 0x40
    else:
        del data[-10:]
    victim.write_bytes(bytes(data))
    with pytest.raises(errors.PartDamaged, match=rf"part 3 of {len(parts) - 1} \({victim.name}\) .* is damaged"):
        verify.verify_and_stage(index, root=trust.load_root(s.root_path), store_dir=tmp_path / "store")
    assert list((tmp_path / "store").iterdir()) == []


def test_cli_build_with_images_split_and_delta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s, src1, src2 = _versions(tmp_path, size=128 * 1024)
    key = tmp_path / "k"
    cli.main(["keygen", "--out", str(key), "--name", "rel"])
    work = tmp_path / "w"
    work.mkdir()
    prof = img_kit.profile(work)
    base = ["build", "--profile", str(prof), "--platform", str(work / "platform"), "--no-mirror",
            "--key", str(key / "rel.key"), "--compression", "none"]
    assert cli.main([*base, "--out", str(tmp_path / "v1.efb"), "--release", "1", "--images-from", f"oci:{src1}"]) == 0
    capsys.readouterr()
    code = cli.main(["--json", *base, "--out", str(tmp_path / "v2.efb"), "--release", "2", "--version", "2.0.0",
                     "--images-from", f"oci:{src2}", "--base", str(tmp_path / "v1.efb"), "--max-part-size", "300K"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["parts"]) >= 2 and out["imageBlobs"] > 0
    code = cli.main([*base, "--out", str(tmp_path / "x.efb"), "--release", "3", "--images-from",
                     f"oci:{tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert code == errors.BuildError.exit_code and "no OCI image layout" in err
    # without --images-from the build works as before and notes the images it does not carry
    assert cli.main([*base, "--out", str(tmp_path / "n.efb"), "--release", "4"]) == 0
    assert "2 container image(s) referenced but not carried" in capsys.readouterr().err


async def test_agent_intake_refuses_a_delta_without_its_base(tmp_path: Path) -> None:
    from agent import intake

    s, src1, src2 = _versions(tmp_path, size=64 * 1024)
    v1 = s.build(tmp_path / "v1.efb", source=src1, release=1)
    d2 = s.build(tmp_path / "d2.efb", source=src2, release=2, version="2.0.0", base=v1.path)
    ctx = img_kit.agent_ctx(tmp_path, loader="none")
    with pytest.raises(errors.BaseMissing, match=r"needs its base bundle demo-1\.0\.0 \(release 1\)"):
        await intake.import_bundle(ctx, d2.path)
    rejected = img_kit.events_of(ctx, "bundle.rejected")
    assert rejected and rejected[-1]["data"]["reason"] == "base-missing"
    await intake.import_bundle(ctx, v1.path)
    assert (await intake.import_bundle(ctx, d2.path)).release == 2


def test_cli_split_join_and_sign_refuses_a_split_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src, size=200 * 1024)
    s = img_kit.Signer(tmp_path)
    res = s.build(tmp_path / "b.efb", source=src)
    whole = res.path.read_bytes()
    assert cli.main(["--json", "split", str(res.path), "--max-part-size", "256K"]) == 0
    parts = json.loads(capsys.readouterr().out)["parts"]
    assert len(parts) > 3 and split.is_split(res.path)
    key = tmp_path / "k"
    cli.main(["keygen", "--out", str(key), "--name", "second"])
    capsys.readouterr()
    assert cli.main(["sign", str(res.path), "--key", str(key / "second.key")]) == errors.UsageError.exit_code
    assert "is a split bundle" in capsys.readouterr().err
    assert cli.main(["join", str(res.path), "--out", str(tmp_path / "joined.efb")]) == 0
    assert (tmp_path / "joined.efb").read_bytes() == whole
    Path(parts[1]).write_bytes(Path(parts[1]).read_bytes()[:-1] + b"\0")
    capsys.readouterr()
    assert cli.main(["join", str(res.path), "--out", str(tmp_path / "j2.efb")]) == errors.PartDamaged.exit_code
    assert f"part 2 of {len(parts)} ({Path(parts[1]).name})" in capsys.readouterr().err
    assert not (tmp_path / "j2.efb").exists()


async def test_agent_inbox_imports_a_split_bundle_and_ignores_its_parts(tmp_path: Path) -> None:
    import os
    import time

    from agent import intake

    s, index, _whole, parts = _split_bundle(tmp_path)
    ctx = img_kit.agent_ctx(tmp_path, loader="none")
    inbox = ctx.config.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    for p in parts:
        os.replace(p, inbox / p.name)
        old = time.time() - 60
        os.utime(inbox / p.name, (old, old))
    results = await intake.import_inbox(ctx)
    assert len(results) == 1, results  # the index only: *.part files are not bundles of their own
    dest, result = results[0]
    assert isinstance(result, intake.ImportResult) and result.release == 1
    # The index moves to done/ together with its parts, in a directory of its own.
    assert dest.parent.parent.name == "done" and dest.name == index.name
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted(p.name for p in parts)
    assert not [p for p in inbox.iterdir() if p.is_file()], "parts left behind in the inbox"
    assert not (inbox / "rejected").exists()
    del s


async def test_agent_inbox_waits_for_parts_still_being_copied(tmp_path: Path) -> None:
    import os
    import time

    from agent import intake

    _s, index, _whole, parts = _split_bundle(tmp_path)
    ctx = img_kit.agent_ctx(tmp_path, loader="none")
    inbox = ctx.config.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    old = time.time() - 60
    for p in parts[:2]:  # the index and the first part have arrived; the rest is still on its way
        os.replace(p, inbox / p.name)
        os.utime(inbox / p.name, (old, old))
    ((path, result),) = await intake.import_inbox(ctx)
    assert isinstance(result, errors.PartMissing) and path == inbox / index.name and path.exists()
    assert not (inbox / "rejected").exists() and not img_kit.events_of(ctx, "bundle.rejected")
    for p in parts[2:]:
        os.replace(p, inbox / p.name)
        os.utime(inbox / p.name, (old, old))
    ((dest, result),) = await intake.import_inbox(ctx)
    assert isinstance(result, intake.ImportResult) and dest.parent.parent.name == "done"


def test_cli_split_and_join_failures_are_one_line_with_their_code(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["split", str(tmp_path / "nope.efb")]) == errors.Unreadable.exit_code
    assert capsys.readouterr().err.startswith("edgefleet-bundle: unreadable: cannot read bundle")
    not_an_index = tmp_path / "list.efb"
    not_an_index.write_text("[1, 2]")
    assert cli.main(["join", str(not_an_index), "--out", str(tmp_path / "j.efb")]) == errors.Garbled.exit_code
    err = capsys.readouterr().err
    assert err.startswith("edgefleet-bundle: garbled: list.efb is neither a bundle nor a split index")
    assert err.count("\n") == 1 and not (tmp_path / "j.efb").exists()


def test_split_that_cannot_write_a_part_leaves_the_bundle_whole(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    img_kit.make_source(src, size=200 * 1024)
    res = img_kit.Signer(tmp_path).build(tmp_path / "b.efb", source=src)
    whole = res.path.read_bytes()
    (tmp_path / ".b.efb.002.part.tmp").mkdir()  # part 2 cannot be created: as if the stick were full
    assert cli.main(["split", str(res.path), "--max-part-size", "256K"]) == errors.StoreError.exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"edgefleet-bundle: store-error: cannot split {res.path}:") and err.count("\n") == 1
    assert res.path.read_bytes() == whole and not list(tmp_path.glob("b.efb.*.part"))
