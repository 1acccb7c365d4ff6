"""edgefleet-bundle end to end: keygen, rotate-root, build, sign, verify, inspect; exit codes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from bundles import cli, errors

PROFILE = {
    "name": "mini",
    "tiers": {1: {"priorityClassName": "platform-infrastructure", "tolerateControlPlane": True, "spread": True}},
    "components": [
        {"name": "priority-classes", "layer": 0, "tier": 1, "sources": [{"kustomize": "IT/priorityclasses"}]},
        {"name": "namespaces", "layer": 0, "tier": 1, "sources": [{"platform": "IT/namespaces/argocd.yaml"}]},
    ],
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end(tmp_path: Path, platform: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k = tmp_path / "keys"
    for name in ("a", "b", "c"):
        code, out, _ = run(capsys, "--json", "keygen", "--out", str(k), "--name", name)
        assert code == 0 and len(json.loads(out)["keyid"]) == 64
    assert stat.S_IMODE((k / "a.key").stat().st_mode) == 0o600
    code, _, err = run(capsys, "keygen", "--out", str(k), "--name", "a")
    assert code == errors.KeyInvalid.exit_code and "already exists" in err

    root = tmp_path / "root.json"
    code, out, _ = run(capsys, "rotate-root", "--release-key", str(k / "a.pub"), "--release-key", str(k / "b.pub"),
                       "--threshold", "2", "--sign-key", str(k / "a.key"), "--out", str(root))
    assert code == 0 and "NOT complete" in out
    code, out, _ = run(capsys, "sign", str(root), "--key", str(k / "b.key"))
    assert code == 0 and "2 signature(s)" in out

    prof = tmp_path / "mini.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    bundle = tmp_path / "mini.efb"
    code, out, _ = run(capsys, "--json", "build", "--profile", str(prof), "--platform", str(platform / "idp-blueprint"),
                       "--no-mirror", "--out", str(bundle), "--release", "3", "--version", "2.0.0",
                       "--key", str(k / "a.key"))
    assert code == 0, out
    built = json.loads(out)
    assert built["release"] == 3 and built["signatures"] == 1 and built["needsHelm"] == []

    code, _, err = run(capsys, "verify", str(bundle), "--root", str(root))
    assert code == errors.BelowThreshold.exit_code
    assert err.count("\n") == 1 and err.startswith("edgefleet-bundle: below-threshold:")

    code, out, _ = run(capsys, "sign", str(bundle), "--key", str(k / "b.key"))
    assert code == 0
    store = tmp_path / "store"
    code, out, _ = run(capsys, "--json", "verify", str(bundle), "--root", str(root), "--store", str(store),
                       "--kubernetes-version", "1.33.0", "--arch", "amd64", "--min-release", "3")
    assert code == 0
    res = json.loads(out)
    assert res["ok"] and Path(res["staged"]).parent == store and len(res["signers"]) == 2

    code, _, err = run(capsys, "verify", str(bundle), "--root", str(root), "--min-release", "4")
    assert code == errors.ReleaseRollback.exit_code and "release-rollback" in err
    code, _, err = run(capsys, "verify", str(bundle), "--root", str(root), "--now", "2099-01-01T00:00:00Z")
    assert code in (errors.Expired.exit_code, errors.RootExpired.exit_code)

    code, out, _ = run(capsys, "inspect", str(bundle), "--files")
    assert code == 0 and "NOT VERIFIED" in out and "priority-classes" in out and "mini-2.0.0" in out
    code, out, _ = run(capsys, "--json", "inspect", str(bundle))
    assert json.loads(out)["verified"] is False

    # Rotate to c (threshold 1): old a+b and new c sign; ship the link in a bundle signed by c only.
    root2 = tmp_path / "root-v2.json"
    code, out, _ = run(capsys, "rotate-root", "--old", str(root), "--release-key", str(k / "c.pub"), "--threshold",
                       "1", "--sign-key", str(k / "a.key"), "--sign-key", str(k / "b.key"), "--sign-key",
                       str(k / "c.key"), "--out", str(root2))
    assert code == 0 and "verifies" in out
    b2 = tmp_path / "mini2.efb"
    code, out, _ = run(capsys, "build", "--profile", str(prof), "--platform", str(platform / "idp-blueprint"),
                       "--no-mirror", "--out", str(b2), "--release", "4", "--key", str(k / "c.key"),
                       "--root-chain", str(root2))
    assert code == 0, out
    code, out, _ = run(capsys, "verify", str(b2), "--root", str(root))
    assert code == 0 and "rotated to v2" in out
    code, out, _ = run(capsys, "--json", "inspect", str(b2))
    assert json.loads(out)["rootChainLinks"] == 1


def test_cli_failures_are_one_line_with_distinct_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "verify", str(tmp_path / "nope.efb"), "--root", str(tmp_path / "root.json"))
    assert code == errors.RootInvalid.exit_code and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        cli.main(["verify"])
    assert info.value.code == 2
    junk = tmp_path / "junk.efb"
    junk.write_bytes(b"\x1f\x8b" + b"\x00" * 600)
    code, _, err = run(capsys, "inspect", str(junk))
    assert code == errors.WrongCompression.exit_code and "gzip" in err
    code, _, err = run(capsys, "build", "--platform", str(tmp_path), "--no-mirror", "--out", str(tmp_path / "x"),
                       "--release", "1")
    assert code == errors.BuildError.exit_code and err.startswith("edgefleet-bundle: build-failed: component")


def test_keygen_where_keys_cannot_be_written_is_key_invalid(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, "keygen", "--out", str(blocker), "--name", "x")
    assert code == errors.KeyInvalid.exit_code
    assert err.startswith(f"edgefleet-bundle: key-invalid: cannot create key directory {blocker}")
    assert err.count("\n") == 1
    code, _, err = run(capsys, "keygen", "--out", str(blocker / "sub"), "--name", "x")
    assert code == errors.KeyInvalid.exit_code and err.count("\n") == 1


def test_build_and_sign_outputs_that_cannot_be_written_are_store_errors(
        tmp_path: Path, platform: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "keygen", "--out", str(tmp_path / "k"), "--name", "a")
    prof = tmp_path / "mini.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    build = ["build", "--profile", str(prof), "--platform", str(platform / "idp-blueprint"), "--no-mirror",
             "--release", "1", "--key", str(tmp_path / "k" / "a.key")]
    code, _, err = run(capsys, *build, "--out", str(blocker / "b.efb"))
    assert code == errors.StoreError.exit_code and err.count("\n") == 1
    assert err.startswith(f"edgefleet-bundle: store-error: cannot write {blocker / 'b.efb'}:")
    good = tmp_path / "b.efb"
    assert run(capsys, *build, "--out", str(good))[0] == 0
    before = good.read_bytes()
    code, _, err = run(capsys, "sign", str(good), "--key", str(tmp_path / "k" / "a.key"), "--out",
                       str(blocker / "signed.efb"))
    assert code == errors.StoreError.exit_code and err.count("\n") == 1
    assert good.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
