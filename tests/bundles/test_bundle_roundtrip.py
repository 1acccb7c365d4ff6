"""Round trip: build, sign (k-of-n, separately), verify, stage, load objects."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat

import pytest
from bundle_kit import NOW, Kit, snapshot

from bundles import container, content, errors, pack, trust, verify


def test_round_trip_k_of_n(kit: Kit) -> None:
    # Build with one signature; a second holder adds theirs on "another machine".
    path = kit.bundle(signers=kit.release_keys[:1])
    with pytest.raises(errors.BelowThreshold):
        verify.verify_only(path, root=kit.root, now=NOW)
    pack.sign_bundle(path, keys=[kit.release_keys[2]])

    staged = verify.verify_and_stage(
        path, root=kit.root, store_dir=kit.store, now=NOW, min_release=5, min_created=NOW,
        kubernetes_version="v1.33.2+k3s1", arch="arm64",
    )
    assert staged.path == kit.store / staged.bundle_id
    env = (staged.path / "manifest.dsse.json").read_bytes()
    assert staged.bundle_id == hashlib.sha256(env).hexdigest()
    assert (staged.path / "manifest.json").read_bytes() == json.dumps(
        json.loads((staged.path / "manifest.json").read_bytes()), sort_keys=True, separators=(",", ":")
    ).encode()
    for path_, data in kit.files().items():
        f = staged.payload_dir / path_
        assert f.read_bytes() == data
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert staged.signers == {trust.dsse.keyid_of(k.public_key()) for k in (kit.release_keys[0], kit.release_keys[2])}
    assert not staged.root_rotated
    # No staging leftovers, the older bundle untouched.
    assert sorted(os.listdir(kit.store)) == sorted([staged.bundle_id, "older-bundle"])

    objs = content.load_objects(staged.path, staged.manifest.component("demo"))
    assert [o["kind"] for o in objs] == ["Namespace", "Deployment", "ConfigMap", "ConfigMap"]
    assert objs[-1]["data"]["op"] == "="  # the YAML 1.1 value tag, read as Go YAML does
    assert staged.manifest.installable()[0].name == "demo"


def test_restage_same_bundle_replaces_atomically(kit: Kit) -> None:
    path = kit.bundle()
    first = verify.verify_and_stage(path, root=kit.root, store_dir=kit.store, now=NOW)
    (first.payload_dir / "demo/001-namespace.yaml").write_bytes(b"tampered on disk")
    again = verify.verify_and_stage(path, root=kit.root, store_dir=kit.store, now=NOW)
    assert again.path == first.path
    assert (again.payload_dir / "demo/001-namespace.yaml").read_bytes() == kit.files()["demo/001-namespace.yaml"]
    assert sorted(os.listdir(kit.store)) == sorted([first.bundle_id, "older-bundle"])


def test_uncompressed_container_round_trip(kit: Kit) -> None:
    path = kit.bundle(compression="none")
    assert path.read_bytes()[257:262] == b"ustar"
    staged = verify.verify_and_stage(path, root=kit.root, store_dir=kit.store, now=NOW)
    assert staged.compression == "none"


def test_manifest_is_first_member_and_archive_is_deterministic(kit: Kit) -> None:
    a = kit.bundle()
    env, chain, compression = verify.read_envelope(a)
    assert compression == "zstd" and chain == ()
    assert json.loads(env)["payloadType"] == "application/vnd.edgefleet.bundle-manifest.v1+json"
    b = kit.bundle()
    assert a.read_bytes() == b.read_bytes()  # same inputs, same bytes (mtime 0, uid 0, fixed order)


def test_sign_refuses_payload_that_does_not_match(kit: Kit) -> None:
    members = kit.members()
    members[1] = (members[1][0], members[1][1].replace(b"demo", b"evil"))
    path = kit.raw(members)
    before = path.read_bytes()
    with pytest.raises(errors.DigestMismatch):
        pack.sign_bundle(path, keys=[kit.release_keys[0]])
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_cleanup_stale_removes_only_staging_leftovers(kit: Kit) -> None:
    (kit.store / f"{verify.STAGING_PREFIX}abc").mkdir()
    (kit.store / f"{verify.TRASH_PREFIX}def").mkdir()
    removed = verify.cleanup_stale(kit.store)
    assert len(removed) == 2
    assert sorted(os.listdir(kit.store)) == ["older-bundle"]


def test_disk_full_is_a_store_error_and_leaves_nothing(kit: Kit) -> None:
    path = kit.bundle()
    before = snapshot(kit.store)
    limits = verify.Limits(min_free_bytes=1 << 62)  # "the disk is full"
    with pytest.raises(errors.StoreError):
        verify.verify_and_stage(path, root=kit.root, store_dir=kit.store, now=NOW, limits=limits)
    assert snapshot(kit.store) == before


def test_root_file_round_trip(kit: Kit, tmp_path: os.PathLike[str]) -> None:
    p = kit.tmp / "trust" / "root.json"
    trust.save_root(p, kit.root_bytes)
    assert trust.load_root(p) == kit.root
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    # A root below its own threshold is refused on load.
    thin = trust.sign_root(kit.root, keys=kit.release_keys[:1]).to_json()
    trust.save_root(p, thin)
    with pytest.raises(errors.RootInvalid):
        trust.load_root(p)


def test_development_bundle_needs_development_keys(kit: Kit) -> None:
    dev = trust.keys.generate()
    root = trust.make_root(
        release=[k.public_key() for k in kit.release_keys], threshold=2, development=[dev.public_key()],
        expires=NOW + dt.timedelta(days=10),
    )
    path = kit.bundle(channel="development", signers=[dev])
    assert verify.verify_only(path, root=root, now=NOW).manifest.channel == "development"
    with pytest.raises(errors.UnknownKey):  # a production root lists no development keys
        verify.verify_only(path, root=kit.root, now=NOW)
    # A development key cannot sign a release bundle.
    rel = kit.bundle(signers=[dev])
    with pytest.raises(errors.UnknownKey):
        verify.verify_only(rel, root=root, now=NOW)


def test_payload_paths_and_container_layout(kit: Kit) -> None:
    path = kit.bundle()
    with open(path, "rb") as fh:
        stream = container.CappedStream(fh, "zstd", limit=1 << 30)
        names = []
        while (hdr := container.next_header(stream)) is not None:
            names.append(hdr.name)
            stream.read_exact(hdr.size + container.padding(hdr.size), what="x")
    assert names == ["manifest.dsse.json", "payload/demo/001-namespace.yaml", "payload/demo/002-web.yaml"]


def test_load_and_recheck_staged(kit: Kit) -> None:
    staged = verify.verify_and_stage(kit.bundle(), root=kit.root, store_dir=kit.store, now=NOW)
    assert verify.load_staged(staged.path) == staged.manifest
    assert verify.recheck_staged(staged.path) == staged.manifest
    (staged.payload_dir / "demo/002-web.yaml").write_bytes(b"kind: Pod\n")
    with pytest.raises(errors.DigestMismatch):
        verify.recheck_staged(staged.path)
    (staged.payload_dir / "demo/002-web.yaml").unlink()
    with pytest.raises(errors.MissingFile):
        verify.recheck_staged(staged.path)
    (staged.path / "manifest.json").write_bytes(b"{}")
    with pytest.raises(errors.DigestMismatch):
        verify.load_staged(staged.path)
    with pytest.raises(errors.MissingFile):
        verify.load_staged(kit.store / "older-bundle")
