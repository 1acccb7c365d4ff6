"""Property tests: any input to the parsers either parses or raises a clean error, never crashes."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from bundle_kit import NOW, Kit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundles import container, dsse, errors, manifest, trust, verify

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)

MANIFEST_KEYS = ["schemaVersion", "name", "version", "release", "created", "expires", "files", "components",
                 "tiers", "compat", "compression", "channel"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_manifest_parse_arbitrary_bytes(data: bytes) -> None:
    try:
        manifest.parse_manifest(data)
    except errors.ManifestInvalid as exc:
        assert "\n" not in str(exc)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(MANIFEST_KEYS), json_values, max_size=12))
def test_manifest_parse_arbitrary_json(doc: dict[str, Any]) -> None:
    doc.setdefault("schemaVersion", 1)
    with contextlib.suppress(errors.ManifestInvalid):
        manifest.parse_manifest(json.dumps(doc).encode())


paths = st.lists(st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9][a-z0-9._-]{0,7}){0,2}", fullmatch=True), min_size=1,
                 max_size=5, unique=True)


@settings(max_examples=60, deadline=None)
@given(
    paths=paths,
    release=st.integers(min_value=0, max_value=2**53),
    version=st.from_regex(r"(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})", fullmatch=True),
    seconds=st.integers(min_value=1, max_value=10**9),
    tier=st.integers(min_value=1, max_value=4),
)
def test_manifest_canonical_round_trip(paths: list[str], release: int, version: str, seconds: int, tier: int) -> None:
    # Drop paths that lie under another path ("a" and "a/b"): the model refuses those by design.
    names = [p for p in paths if not any(p.startswith(q + "/") or q.startswith(p + "/") for q in paths if q != p)]
    if not names:
        return
    files = tuple(manifest.FileEntry(path=p, size=1, sha256="a" * 64) for p in names)
    m = manifest.Manifest(
        name="x", version=version, release=release, created=NOW, expires=NOW + dt.timedelta(seconds=seconds),
        files=files, tiers={tier: manifest.TierPolicy()},
        components=(manifest.Component(name="c", layer=0, tier=tier, files=tuple(names),
                                       source=manifest.Source(type="files")),),
    )
    raw = manifest.canonical_json(m)
    back = manifest.parse_manifest(raw)
    assert back == m
    assert manifest.canonical_json(back) == raw


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_envelope_parse_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(dsse.EnvelopeError):
        dsse.parse(data, max_bytes=300)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["payload", "payloadType", "signatures"]), json_values, max_size=3),
       st.lists(st.dictionaries(st.sampled_from(["keyid", "sig"]), json_values | st.binary().map(
           lambda b: base64.b64encode(b).decode()), max_size=2), max_size=3))
def test_envelope_parse_arbitrary_json(doc: dict[str, Any], sigs: list[Any]) -> None:
    if sigs:
        doc["signatures"] = sigs
    try:
        env = dsse.parse(json.dumps(doc).encode(), max_bytes=1 << 20)
    except dsse.EnvelopeError:
        return
    assert isinstance(env.payload, bytes)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_root_parse_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(errors.RootInvalid):
        trust.parse_root(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=2048), zstd=st.booleans())
def test_verify_arbitrary_files_is_a_bundle_error(kit: Kit, data: bytes, zstd: bool) -> None:
    path: Path = kit.tmp / "fuzz.efb"
    path.write_bytes((container.ZSTD_MAGIC if zstd else b"") + data)
    with contextlib.suppress(errors.BundleError):
        verify.verify_only(path, root=kit.root, now=NOW)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_rejected_or_harmless(kit: Kit, position: int, value: int) -> None:
    path = kit.tmp / "base.efb"
    if not path.exists():
        path.write_bytes(kit.bundle(compression="none").read_bytes())
    data = bytearray(path.read_bytes())
    i = position % len(data)
    if data[i] == value:
        return
    data[i] = value
    mutated = kit.tmp / "mutated.efb"
    mutated.write_bytes(bytes(data))
    try:
        staged = verify.verify_only(mutated, root=kit.root, now=NOW)
    except errors.BundleError:
        return
    # Accepted only if the change touched bytes nothing depends on (header padding, mtime, mode...):
    # the signed manifest and every payload byte are intact.
    original = verify.verify_only(path, root=kit.root, now=NOW)
    assert staged.manifest == original.manifest and staged.bundle_id == original.bundle_id


DEEP = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # far past the JSON decoder's recursion limit


def test_deeply_nested_json_is_a_clean_error(kit: Kit) -> None:
    """Nesting too deep to decode (RecursionError) is refused like any other bad JSON, never a crash."""
    with pytest.raises(dsse.EnvelopeError):
        dsse.parse(DEEP, max_bytes=1 << 21)
    with pytest.raises(errors.RootInvalid):
        trust.parse_root(DEEP)
    with pytest.raises(errors.ManifestInvalid):
        manifest.parse_manifest(DEEP)
    with pytest.raises(errors.ChainBroken):
        trust.parse_chain(DEEP)
    members = kit.members()
    members[0] = (container.ENVELOPE_NAME, DEEP)
    with pytest.raises(errors.EnvelopeInvalid):
        verify.verify_only(kit.raw(members), root=kit.root, now=NOW)
    index = kit.tmp / "deep-index.efb"  # starts with "{": read as a split bundle's index
    index.write_bytes(DEEP)
    with pytest.raises(errors.Garbled):
        verify.verify_only(index, root=kit.root, now=NOW)
