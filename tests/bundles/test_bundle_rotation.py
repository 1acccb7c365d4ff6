"""Trust-root rotation: a valid chain, a broken link, a chain that is too long, chains in bundles."""

from __future__ import annotations

import datetime as dt

import pytest
from bundle_kit import NOW, Kit, link, snapshot

from bundles import errors, keys, trust, verify


def test_valid_chain_two_rotations(kit: Kit) -> None:
    g2 = [keys.generate() for _ in range(3)]
    g3 = [keys.generate() for _ in range(2)]
    chain = [link(kit.release_keys, g2, version=2), link(g2, g3, version=3)]
    new = trust.verify_chain(kit.root, chain, now=NOW)
    assert new.version == 3
    assert set(new.keys) == {trust.dsse.keyid_of(k.public_key()) for k in g3}
    # Links the site already has are skipped: the full history can travel in every bundle.
    assert trust.verify_chain(new, chain, now=NOW) == new


def test_chain_inside_bundle_rotates_then_verifies_with_new_keys(kit: Kit) -> None:
    g2 = [keys.generate() for _ in range(3)]
    chain = [link(kit.release_keys, g2, version=2)]
    path = kit.bundle(signers=g2[:2], chain=chain)
    staged = verify.verify_and_stage(path, root=kit.root, store_dir=kit.store, now=NOW)
    assert staged.root_rotated and staged.root.version == 2
    assert staged.root_chain == tuple(chain)
    assert (staged.path / "root-chain.json").is_file()
    # The new root as a root.json (a site stores the chain instead: test_bundle_trust_store.py);
    # old keys alone no longer suffice.
    trust.save_root(kit.tmp / "root.json", staged.root_chain[-1])
    assert trust.load_root(kit.tmp / "root.json").version == 2
    old_signed = kit.bundle()
    with pytest.raises(errors.UnknownKey):
        verify.verify_only(old_signed, root=staged.root, now=NOW)


def test_broken_link_new_keys_only(kit: Kit) -> None:
    g2 = [keys.generate() for _ in range(3)]
    bad = link(kit.release_keys, g2, version=2, signers=g2[:2])  # the old council never agreed
    with pytest.raises(errors.ChainBroken, match="old root v1"):
        trust.verify_chain(kit.root, [bad], now=NOW)


def test_broken_link_old_keys_only(kit: Kit) -> None:
    g2 = [keys.generate() for _ in range(3)]
    bad = link(kit.release_keys, g2, version=2, signers=kit.release_keys[:2])  # new keys never proven
    with pytest.raises(errors.ChainBroken, match="new root v2"):
        trust.verify_chain(kit.root, [bad], now=NOW)


def test_broken_link_version_gap(kit: Kit) -> None:
    g3 = [keys.generate() for _ in range(2)]
    with pytest.raises(errors.ChainBroken, match="does not follow"):
        trust.verify_chain(kit.root, [link(kit.release_keys, g3, version=3)], now=NOW)


def test_broken_link_in_bundle_leaves_store_unchanged(kit: Kit) -> None:
    g2 = [keys.generate() for _ in range(3)]
    path = kit.bundle(signers=g2[:2], chain=[link(kit.release_keys, g2, version=2, signers=g2[:2])])
    before = snapshot(kit.store)
    with pytest.raises(errors.ChainBroken):
        verify.verify_and_stage(path, root=kit.root, store_dir=kit.store, now=NOW)
    assert snapshot(kit.store) == before


def test_chain_too_long(kit: Kit) -> None:
    chain = []
    prev = kit.release_keys
    for v in range(2, 2 + trust.MAX_CHAIN + 1):
        nxt = [keys.generate() for _ in range(2)]
        chain.append(link(prev, nxt, version=v))
        prev = nxt
    with pytest.raises(errors.ChainTooLong):
        trust.verify_chain(kit.root, chain, now=NOW)
    # ... and inside a bundle, refused before any signature work or staging.
    path = kit.bundle(signers=prev, chain=chain)
    before = snapshot(kit.store)
    with pytest.raises(errors.ChainTooLong):
        verify.verify_and_stage(path, root=kit.root, store_dir=kit.store, now=NOW)
    assert snapshot(kit.store) == before


def test_expired_intermediate_is_fine_but_final_must_be_valid(kit: Kit) -> None:
    g2 = [keys.generate() for _ in range(2)]
    g3 = [keys.generate() for _ in range(2)]
    past = NOW - dt.timedelta(days=1)
    chain = [link(kit.release_keys, g2, version=2, expires=past), link(g2, g3, version=3)]
    assert trust.verify_chain(kit.root, chain, now=NOW).version == 3
    with pytest.raises(errors.RootExpired):
        trust.verify_chain(kit.root, chain[:1], now=NOW)


def test_keyid_must_match_public_key(kit: Kit) -> None:
    doc = kit.root.model_dump(by_alias=True, mode="json")
    kid = next(iter(doc["keys"]))
    doc["keys"]["0" * 64] = doc["keys"].pop(kid)
    with pytest.raises(ValueError, match="sha256"):
        trust.TrustRoot.model_validate(doc)


def test_threshold_must_be_reachable() -> None:
    k = keys.generate()
    with pytest.raises(errors.RootInvalid):
        trust.make_root(release=[k.public_key()], threshold=2, expires=NOW)


def test_chain_attached_after_build_survives_signing(kit: Kit) -> None:
    from bundles import pack

    g2 = [keys.generate() for _ in range(3)]
    path = kit.bundle(signers=g2[:1])
    pack.attach_chain(path, [link(kit.release_keys, g2, version=2)])
    with pytest.raises(errors.BelowThreshold):
        verify.verify_only(path, root=kit.root, now=NOW)
    pack.sign_bundle(path, keys=[g2[1]])
    res = verify.verify_only(path, root=kit.root, now=NOW)
    assert res.root_rotated and res.root.version == 2 and len(res.signers) == 2
