"""One test per rejection class: the error class AND an unchanged store (no staging left over)."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bundle_kit import NOW, Kit, _header, link, snapshot

from bundles import container, errors, keys, manifest, verify


def rejects(kit: Kit, path: Path, exc: type[errors.BundleError], **kw: Any) -> errors.BundleError:
    """verify_and_stage must raise ``exc`` and leave the store byte-for-byte as it was."""
    kw.setdefault("now", NOW)
    before = snapshot(kit.store)
    with pytest.raises(exc) as info:
        verify.verify_and_stage(path, root=kit.root, store_dir=kit.store, **kw)
    assert snapshot(kit.store) == before
    assert "\n" not in str(info.value)
    with pytest.raises(exc):
        verify.verify_only(path, root=kit.root, **kw)
    return info.value


# --- payload integrity --------------------------------------------------------------------------


def test_byte_flipped_in_payload_uncompressed(kit: Kit) -> None:
    path = kit.bundle(compression="none")
    data = bytearray(path.read_bytes())
    at = data.index(b"kind: Deployment")
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    rejects(kit, path, errors.DigestMismatch)


@pytest.mark.parametrize("which", [0, 1])
def test_byte_flipped_in_every_payload_file(kit: Kit, which: int) -> None:
    members = kit.members()
    name, data = members[1 + which]
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x20
    members[1 + which] = (name, bytes(flipped))
    rejects(kit, kit.raw(members), errors.DigestMismatch)


def test_byte_flipped_in_compressed_stream(kit: Kit) -> None:
    path = kit.bundle()
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    rejects(kit, path, (errors.Garbled, errors.DigestMismatch))  # type: ignore[arg-type]


def test_manifest_edit_after_signing(kit: Kit) -> None:
    members = kit.members()
    env = json.loads(members[0][1])
    import base64

    doc = json.loads(base64.b64decode(env["payload"]))
    doc["release"] = 999
    env["payload"] = base64.b64encode(json.dumps(doc).encode()).decode()
    members[0] = (container.ENVELOPE_NAME, json.dumps(env).encode())
    rejects(kit, kit.raw(members), errors.SignatureInvalid)


# --- signatures and policy -----------------------------------------------------------------------


def test_unknown_key(kit: Kit) -> None:
    stranger = keys.generate()
    rejects(kit, kit.bundle(signers=[stranger, keys.generate()]), errors.UnknownKey)


def test_unsigned(kit: Kit) -> None:
    rejects(kit, kit.bundle(signers=[]), errors.UnknownKey)


def test_below_threshold(kit: Kit) -> None:
    rejects(kit, kit.bundle(signers=kit.release_keys[:1] + [keys.generate()]), errors.BelowThreshold)


def test_same_key_twice_counts_once(kit: Kit) -> None:
    members = kit.members()
    env = json.loads(members[0][1])
    env["signatures"] = [env["signatures"][0], env["signatures"][0]]
    members[0] = (container.ENVELOPE_NAME, json.dumps(env).encode())
    rejects(kit, kit.raw(members), errors.BelowThreshold)


def test_expired(kit: Kit) -> None:
    path = kit.bundle()
    rejects(kit, path, errors.Expired, now=NOW + dt.timedelta(days=31))


def test_root_expired(kit: Kit) -> None:
    rejects(kit, kit.bundle(expires=NOW + dt.timedelta(days=900)), errors.RootExpired,
            now=NOW + dt.timedelta(days=400))


def test_release_rollback(kit: Kit) -> None:
    rejects(kit, kit.bundle(), errors.ReleaseRollback, min_release=6)


def test_older_created(kit: Kit) -> None:
    rejects(kit, kit.bundle(), errors.CreatedRollback, min_created=NOW + dt.timedelta(seconds=1))


@pytest.mark.parametrize("kw", [{"kubernetes_version": "1.27.3"}, {"kubernetes_version": "v1.35.0"},
                                {"arch": "riscv64"}])
def test_incompatible(kit: Kit, kw: dict[str, str]) -> None:
    rejects(kit, kit.bundle(), errors.Incompatible, **kw)


def test_wrong_payload_type(kit: Kit) -> None:
    members = kit.members()
    env = json.loads(members[0][1])
    env["payloadType"] = "application/vnd.edgefleet.command+json"
    members[0] = (container.ENVELOPE_NAME, json.dumps(env).encode())
    rejects(kit, kit.raw(members), errors.EnvelopeInvalid)


def test_envelope_too_large(kit: Kit) -> None:
    members = kit.members()
    members[0] = (container.ENVELOPE_NAME, members[0][1] + b" " * 5000)
    rejects(kit, kit.raw(members), errors.EnvelopeTooLarge, limits=verify.Limits(max_envelope_bytes=4096))


def test_manifest_not_first(kit: Kit) -> None:
    members = kit.members()
    rejects(kit, kit.raw([members[1], members[0], members[2]]), errors.EnvelopeInvalid)



def test_root_chain_over_its_byte_cap(kit: Kit) -> None:
    """The chain member's size is capped before it is read, like the envelope's."""

    g2 = [keys.generate() for _ in range(3)]
    path = kit.bundle(signers=g2[:2], chain=[link(kit.release_keys, g2, version=2)])
    rejects(kit, path, errors.ChainTooLong, limits=verify.Limits(max_chain_bytes=256))


# --- verification order: a bundle wrong in several ways fails at the earliest step -------------------


def test_order_signatures_before_expiry_compatibility_and_rollback(kit: Kit) -> None:
    stranger = keys.generate()
    path = kit.bundle(signers=[stranger])
    rejects(kit, path, errors.UnknownKey, now=NOW + dt.timedelta(days=31), min_release=99, arch="riscv64")


def test_order_envelope_cap_before_signatures(kit: Kit) -> None:
    members = kit.members()
    members[0] = (container.ENVELOPE_NAME, members[0][1] + b" " * 5000)
    rejects(kit, kit.raw(members), errors.EnvelopeTooLarge, limits=verify.Limits(max_envelope_bytes=4096),
            min_release=99)


def test_order_expiry_then_compatibility_then_rollback(kit: Kit) -> None:
    path = kit.bundle()
    late = NOW + dt.timedelta(days=31)
    rejects(kit, path, errors.Expired, now=late, arch="riscv64", min_release=99)
    rejects(kit, path, errors.Incompatible, arch="riscv64", min_release=99, min_created=late)
    rejects(kit, path, errors.ReleaseRollback, min_release=99, min_created=late)


def test_order_rollback_and_compression_before_any_payload_byte(kit: Kit) -> None:
    """Policy is decided on the signed manifest alone: a damaged payload is never even read."""
    members = kit.members()
    name, data = members[2]
    members[2] = (name, data[:-1] + b"!")
    tampered = kit.raw(members)
    rejects(kit, tampered, errors.ReleaseRollback, min_release=99)
    rejects(kit, kit.raw(members, compression="none"), errors.WrongCompression)
    rejects(kit, tampered, errors.CapExceeded, limits=verify.Limits(max_files=1))
    rejects(kit, tampered, errors.DigestMismatch)

# --- container shape ---------------------------------------------------------------------------------


def test_wrong_compression_gzip(kit: Kit) -> None:
    path = kit.bundle(compression="none")
    path.write_bytes(gzip.compress(path.read_bytes()))
    rejects(kit, path, errors.WrongCompression)


def test_wrong_compression_declared_zstd_but_plain_tar(kit: Kit) -> None:
    rejects(kit, kit.raw(kit.members(), compression="none"), errors.WrongCompression)


@pytest.mark.parametrize("flag", [b"2", b"1", b"3", b"4", b"6", b"x", b"L"])
def test_links_devices_and_extension_headers(kit: Kit, flag: bytes) -> None:
    members: list[Any] = kit.members()
    members.insert(1, ("payload/demo/evil", b"" if flag != b"x" else b"30 path=../../etc/passwd\n", flag))
    rejects(kit, kit.raw(members), errors.UnsafeMemberType)


@pytest.mark.parametrize("name", ["/etc/cron.d/evil", "payload/../../etc/passwd", "payload/demo/../../x",
                                  "payload/demo\\..\\x", "payload/demo/bad name.yaml"])
def test_unsafe_paths(kit: Kit, name: str) -> None:
    members: list[Any] = kit.members()
    members.insert(1, (name, b"x"))
    rejects(kit, kit.raw(members), errors.UnsafePath)


def test_duplicate_member(kit: Kit) -> None:
    members = kit.members()
    rejects(kit, kit.raw([*members, members[1]]), errors.DuplicateMember)


def test_duplicate_envelope(kit: Kit) -> None:
    members = kit.members()
    rejects(kit, kit.raw([*members, members[0]]), errors.DuplicateMember)


def test_unlisted_file(kit: Kit) -> None:
    members = kit.members()
    rejects(kit, kit.raw([*members, ("payload/demo/extra.yaml", b"kind: Secret\n")]), errors.UnlistedFile)


def test_unlisted_directory(kit: Kit) -> None:
    members: list[Any] = kit.members()
    members.insert(1, ("payload/other/", b"", b"5"))
    rejects(kit, kit.raw(members), errors.UnlistedFile)


def test_listed_directory_entries_are_accepted(kit: Kit) -> None:
    members: list[Any] = kit.members()
    members.insert(1, ("payload/demo/", b"", b"5"))
    staged = verify.verify_and_stage(kit.raw(members), root=kit.root, store_dir=kit.store, now=NOW)
    assert (staged.payload_dir / "demo/002-web.yaml").is_file()


def test_missing_file(kit: Kit) -> None:
    members = kit.members()
    rejects(kit, kit.raw(members[:2]), errors.MissingFile)


def test_size_beyond_manifest(kit: Kit) -> None:
    members = kit.members()
    name, data = members[2]
    members[2] = (name, data + b"# appended\n")
    rejects(kit, kit.raw(members), errors.SizeMismatch)


def test_size_beyond_caps(kit: Kit) -> None:
    big = {"demo/001-namespace.yaml": b"a" * 10_000}
    rejects(kit, kit.bundle(big), errors.CapExceeded, limits=verify.Limits(max_file_bytes=9_999))
    rejects(kit, kit.bundle(big), errors.CapExceeded, limits=verify.Limits(max_total_bytes=9_999))
    rejects(kit, kit.bundle(), errors.CapExceeded, limits=verify.Limits(max_files=1))


def test_decompression_bomb_trailing_zeros(kit: Kit) -> None:
    # 64 MiB of zeros after the end marker compress to a few KiB: the verifier stops at its cap.
    path = kit.raw(kit.members(), trailer=b"\x00" * (64 << 20))
    assert path.stat().st_size < 100_000
    rejects(kit, path, errors.DecompressionBomb)


def test_decompression_bomb_member_data(kit: Kit) -> None:
    # A header claiming 1 GiB of zeros for a listed file: refused before a byte is read.
    members: list[Any] = kit.members()
    members[1] = _header("payload/demo/001-namespace.yaml", 1 << 30) + b"\x00" * (4 << 20)
    rejects(kit, kit.raw(members, end=b""), errors.SizeMismatch)


def test_trailing_garbage(kit: Kit) -> None:
    rejects(kit, kit.raw(kit.members(), trailer=b"\x00" * 512 + b"junk"), errors.Garbled)


@pytest.mark.parametrize("cut", [10, 600, 0.5, -40])
def test_truncated(kit: Kit, cut: float) -> None:
    path = kit.bundle(compression="none")
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    path.write_bytes(data[: n if cut != -40 else len(data) - 1024 - 40])
    rejects(kit, path, errors.Truncated)


def test_truncated_zstd(kit: Kit) -> None:
    path = kit.bundle()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    rejects(kit, path, (errors.Truncated, errors.Garbled))  # type: ignore[arg-type]


def test_garbled_header_checksum(kit: Kit) -> None:
    members: list[Any] = kit.members()
    bad = bytearray(_header("payload/demo/001-namespace.yaml", len(members[1][1])))
    bad[0] ^= 1
    members[1] = bytes(bad) + members[1][1] + b"\x00" * container.padding(len(members[1][1]))
    rejects(kit, kit.raw(members), errors.Garbled)


def test_garbled_random_bytes(kit: Kit) -> None:
    path = kit.tmp / "random.efb"
    path.write_bytes(hashlib.sha256(b"x").digest() * 100)
    rejects(kit, path, errors.Garbled)


def test_garbled_zstd_body(kit: Kit) -> None:
    path = kit.bundle()
    data = bytearray(path.read_bytes())
    for i in range(8, min(len(data), 200)):
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))
    rejects(kit, path, (errors.Garbled, errors.Truncated))  # type: ignore[arg-type]


def test_not_a_file(kit: Kit) -> None:
    rejects(kit, kit.tmp, errors.Unreadable)
    rejects(kit, kit.tmp / "missing.efb", errors.Unreadable)


def test_every_error_class_has_a_distinct_exit_code() -> None:
    codes = [c.exit_code for c in errors.ALL]
    reasons = [c.reason for c in errors.ALL]
    assert len(set(codes)) == len(codes)
    assert len(set(reasons)) == len(reasons)


def test_every_exit_code_is_documented() -> None:
    """docs/bundle-format.md's table is the operator's contract: each class with its code, nothing stale."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "bundle-format.md").read_text()
    table = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {(int(code), reason) for code, reason in re.findall(r"\|\s*(\d+)\s*\|\s*([a-z-]+)", table)}
    classes = {(c.exit_code, c.reason) for c in errors.ALL}
    assert classes - documented == set(), "undocumented"
    assert {(c, r) for c, r in documented if c >= 10} - classes == set(), "documented but not a class"


def test_checks_run_before_any_payload_is_staged(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """Policy failures happen before the staging directory even exists."""
    created: list[str] = []
    real: Callable[..., str] = verify.tempfile.mkdtemp

    def spy(*a: Any, **k: Any) -> str:
        created.append("x")
        return real(*a, **k)

    monkeypatch.setattr(verify.tempfile, "mkdtemp", spy)
    rejects(kit, kit.bundle(), errors.ReleaseRollback, min_release=99)
    rejects(kit, kit.bundle(signers=[]), errors.UnknownKey)
    assert created == []


def test_manifest_rejects_bad_paths() -> None:
    for bad in ["/abs", "a/../b", "a//b", "./a", "a/b\\c", "", "a b", "x" * 300]:
        with pytest.raises(ValueError):
            manifest.check_path(bad)
