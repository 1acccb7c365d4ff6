"""A site's effective trust root: the seed plus the rotations it stored, re-walked on every load."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from bundle_kit import NOW, Kit, link

from bundles import cli, errors, keys, trust, verify


def _seed(kit: Kit) -> Path:
    path = kit.tmp / "etc" / "root.json"
    trust.save_root(path, kit.root_bytes)
    return path


def test_no_stored_chain_means_the_seed(kit: Kit) -> None:
    eff = trust.load_effective(_seed(kit), kit.tmp / "state" / "root-chain.json")
    assert eff.root == eff.seed == kit.root and eff.links == ()


def test_rotation_persists_and_reloads_from_the_seed(kit: Kit) -> None:
    seed, stored = _seed(kit), kit.tmp / "state" / "trust" / "root-chain.json"
    g2 = [keys.generate() for _ in range(3)]
    g3 = [keys.generate() for _ in range(2)]
    chain = [link(kit.release_keys, g2, version=2), link(g2, g3, version=3)]
    staged = verify.verify_and_stage(kit.bundle(signers=g3, chain=chain), root=kit.root, store_dir=kit.store, now=NOW)

    eff = trust.persist_rotation(trust.load_effective(seed, stored), staged.root_chain, chain_path=stored)
    assert eff.root.version == 3 and len(eff.links) == 2
    assert [p.name for p in stored.parent.iterdir()] == ["root-chain.json"], "no temp file left behind"
    seed_before = seed.read_bytes()

    reloaded = trust.load_effective(seed, stored)
    assert reloaded.root == staged.root and reloaded.seed == kit.root
    assert seed.read_bytes() == seed_before, "the seed is never written"
    # The old council alone no longer verifies anything; the new one does, with no chain in the bundle.
    with pytest.raises(errors.UnknownKey):
        verify.verify_only(kit.bundle(), root=reloaded.root, now=NOW)
    assert verify.verify_only(kit.bundle(signers=g3), root=reloaded.root, now=NOW).root.version == 3


def test_persist_never_lowers_and_skips_what_it_has(kit: Kit) -> None:
    seed, stored = _seed(kit), kit.tmp / "state" / "root-chain.json"
    g2 = [keys.generate() for _ in range(3)]
    g3 = [keys.generate() for _ in range(2)]
    l2, l3 = link(kit.release_keys, g2, version=2), link(g2, g3, version=3)
    eff = trust.persist_rotation(trust.load_effective(seed, stored), [l2, l3], chain_path=stored)
    written = stored.read_bytes()
    # A later bundle carrying only the older link (or the same history again) changes nothing.
    assert trust.persist_rotation(eff, [l2], chain_path=stored) == eff
    assert trust.persist_rotation(eff, [l2, l3], chain_path=stored) == eff
    assert stored.read_bytes() == written


def test_stored_chain_extends_link_by_link(kit: Kit) -> None:
    seed, stored = _seed(kit), kit.tmp / "state" / "root-chain.json"
    g2 = [keys.generate() for _ in range(3)]
    g3 = [keys.generate() for _ in range(2)]
    eff = trust.persist_rotation(trust.load_effective(seed, stored), [link(kit.release_keys, g2, version=2)],
                                 chain_path=stored)
    # The next bundle carries the full history; only v3 is new.
    eff = trust.persist_rotation(eff, [link(kit.release_keys, g2, version=2), link(g2, g3, version=3)],
                                 chain_path=stored)
    assert eff.root.version == 3 and len(json.loads(stored.read_bytes())["links"]) == 2
    assert trust.load_effective(seed, stored).root == eff.root


def _flip_signature(stored: Path, index: int) -> None:
    doc = json.loads(stored.read_bytes())
    sig = bytearray(base64.b64decode(doc["links"][index]["signatures"][0]["sig"]))
    sig[0] ^= 0x01
    doc["links"][index]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    stored.write_text(json.dumps(doc))


def test_tampered_stored_chain_is_refused_naming_the_file(kit: Kit) -> None:
    seed, stored = _seed(kit), kit.tmp / "state" / "root-chain.json"
    g2 = [keys.generate() for _ in range(2)]
    trust.persist_rotation(trust.load_effective(seed, stored), [link(kit.release_keys, g2, version=2)],
                           chain_path=stored)
    _flip_signature(stored, 0)
    with pytest.raises(errors.RootInvalid, match="stored trust chain .*root-chain.json does not chain from the seed"):
        trust.load_effective(seed, stored)
    stored.write_text("{not json")
    with pytest.raises(errors.RootInvalid, match="not JSON"):
        trust.load_effective(seed, stored)


def test_planted_chain_from_another_seed_is_refused(kit: Kit) -> None:
    """A self-consistent chain an attacker made with their own keys does not start at this seed."""
    seed, stored = _seed(kit), kit.tmp / "state" / "root-chain.json"
    mallory = [keys.generate() for _ in range(2)]
    planted = link(mallory, mallory, version=2)  # signed by "old" keys this site never trusted
    stored.parent.mkdir(parents=True)
    stored.write_bytes(trust.chain_json([planted]))
    with pytest.raises(errors.RootInvalid, match="old root v1"):
        trust.load_effective(seed, stored)


def test_a_newer_seed_supersedes_stored_links(kit: Kit) -> None:
    """An operator may install the newest root as the seed; older stored links are skipped, then dropped."""
    seed, stored = _seed(kit), kit.tmp / "state" / "root-chain.json"
    g2 = [keys.generate() for _ in range(3)]
    g3 = [keys.generate() for _ in range(2)]
    l2, l3 = link(kit.release_keys, g2, version=2), link(g2, g3, version=3)
    trust.persist_rotation(trust.load_effective(seed, stored), [l2], chain_path=stored)
    trust.save_root(seed, l2)
    eff = trust.load_effective(seed, stored)
    assert eff.root.version == 2 and eff.links == ()
    eff = trust.persist_rotation(eff, [l2, l3], chain_path=stored)
    assert eff.root.version == 3 and len(json.loads(stored.read_bytes())["links"]) == 1


def test_cli_verify_with_a_sites_stored_chain(kit: Kit, capsys: pytest.CaptureFixture[str]) -> None:
    seed, stored = _seed(kit), kit.tmp / "state" / "root-chain.json"
    g2 = [keys.generate() for _ in range(2)]
    trust.persist_rotation(trust.load_effective(seed, stored), [link(kit.release_keys, g2, version=2)],
                           chain_path=stored)
    bundle = kit.bundle(signers=g2)
    now = NOW.isoformat()
    assert cli.main(["verify", str(bundle), "--root", str(seed), "--now", now]) == errors.UnknownKey.exit_code
    capsys.readouterr()
    assert cli.main(["verify", str(bundle), "--root", str(seed), "--trust-chain", str(stored), "--now", now]) == 0
    assert "trust root v2" in capsys.readouterr().out
    _flip_signature(stored, 0)
    code = cli.main(["verify", str(bundle), "--root", str(seed), "--trust-chain", str(stored), "--now", now])
    assert code == errors.RootInvalid.exit_code
    assert "does not chain from the seed" in capsys.readouterr().err
