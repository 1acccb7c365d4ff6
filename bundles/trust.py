"""The site trust root (``root.json``) and its rotation chain.

Public surface (stable):

- ``TrustRoot``: ``version`` (int, +1 per rotation), ``expires``, ``keys`` {keyid: ``KeyEntry``
  (keytype "ed25519", ``public`` = base64 raw 32 bytes, ``role`` "release" | "development",
  optional ``name``)}, ``thresholds`` {role: k}. ``public_keys(role)``, ``threshold(role)``.
- ``make_root(...)``, ``sign_root(root, keys=..., existing=None) -> dsse.Envelope``,
  ``parse_root(bytes) -> (TrustRoot, Envelope)``, ``load_root(path)``, ``load_root_bytes(path)``,
  ``save_root(path, envelope_bytes)`` (atomic), ``verify_chain(trusted, chain, now=, max_length=)``,
  ``count_valid(envelope, root, role) -> set[keyid]``, ``check_threshold(envelope, root, role)``.
- ``parse_chain(data, max_length=)`` / ``chain_json(links)``: the ``{"links": [...]}`` file format
  shared by a bundle's ``root-chain.json`` and a site's stored chain.
- ``Effective``, ``load_effective(seed_path, chain_path)``, ``persist_rotation(effective, chain,
  chain_path=)``: a site's effective root = its seed plus the rotations it stored (below).

On disk ``root.json`` is a DSSE envelope (payload type ``ROOT_PAYLOAD_TYPE``) over the canonical
JSON of a ``TrustRoot``. keyid = lowercase hex sha256 of the raw public key, so a keyid can never
name a different key than the one listed.

Roles: *release* keys sign release bundles AND root rotations (they are the offline k-of-n
council); *development* keys may only sign bundles whose manifest says ``channel: development``.
A production root simply lists no development keys (threshold absent), so a development bundle
can never reach a production site.

Rotation: root N+1 must be signed by a threshold of root N's release keys AND a threshold of its
own release keys: the old council hands over, the new council accepts (and proves it holds the
keys). A chain [N+1, N+2, ...] can travel inside a bundle so a site that missed rotations
catches up offline; its length is capped (``MAX_CHAIN``) so a hostile bundle cannot make a site
verify an unbounded number of links. Intermediate roots may have expired (a site that slept
for two years must still be able to walk the chain); only the final root's expiry is enforced.

Persisted rotation (the TUF way): the operator-installed ``root.json`` (``/etc/edgefleet/trust``,
read-only to the agent under its systemd unit) is only the *seed*. The rotations a site accepted
are kept as a chain file in its state directory, and the effective root is re-derived from the
seed on every load by walking that chain link by link. A chain file that does not walk from the
seed (planted, or left from another seed) is refused loudly (``RootInvalid`` naming the file), not
skipped: silently falling back to the seed would re-trust keys a rotation retired. Links at or
below the seed's version are skipped, so an operator who installs a newer seed needs no cleanup;
the next persisted rotation drops them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import pydantic
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, field_validator, model_validator

from bundles import dsse, errors, keys
from bundles.manifest import UtcDatetime, _Model, canonical_json, loads_strict, now_utc

ROOT_PAYLOAD_TYPE = "application/vnd.edgefleet.root.v1+json"
MAX_ROOT_BYTES = 256 * 1024
MAX_CHAIN = 8
#: A site's stored chain grows by one link per rotation it ever accepted: generous, but bounded so
#: a planted file cannot make every bundle verification walk without end.
MAX_STORED_LINKS = 256
MAX_STORED_CHAIN_BYTES = 16 * 1024 * 1024
Role = Literal["release", "development"]


class KeyEntry(_Model):
    keytype: Literal["ed25519"] = "ed25519"
    public: str  # base64 of the raw 32-byte public key
    role: Role
    name: str | None = None

    @field_validator("public")
    @classmethod
    def _raw(cls, v: str) -> str:
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("public key is not base64") from None
        if len(raw) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        return v

    def raw(self) -> bytes:
        return base64.b64decode(self.public)


class TrustRoot(_Model):
    schema_version: Literal[1] = 1
    type: Literal["edgefleet-root"] = "edgefleet-root"
    version: int = Field(ge=1)
    expires: UtcDatetime
    keys: dict[str, KeyEntry]
    thresholds: dict[Role, int]

    @model_validator(mode="after")
    def _consistent(self) -> TrustRoot:
        for kid, entry in self.keys.items():
            if hashlib.sha256(entry.raw()).hexdigest() != kid:
                raise ValueError(f"keyid {kid[:16]}... is not the sha256 of its public key")
        if "release" not in self.thresholds:
            raise ValueError("a root needs a release threshold")
        for role, k in self.thresholds.items():
            n = sum(1 for e in self.keys.values() if e.role == role)
            if not 1 <= k <= n:
                raise ValueError(f"{role} threshold {k} is not between 1 and the {n} {role} keys")
        return self

    def public_keys(self, role: Role) -> dict[str, Ed25519PublicKey]:
        return {kid: keys.public_from_raw(e.raw()) for kid, e in self.keys.items() if e.role == role}

    def threshold(self, role: Role) -> int | None:
        return self.thresholds.get(role)


def make_root(
    *,
    release: Iterable[Ed25519PublicKey],
    threshold: int,
    expires: datetime,
    version: int = 1,
    development: Iterable[Ed25519PublicKey] = (),
    development_threshold: int | None = None,
) -> TrustRoot:
    entries: dict[str, KeyEntry] = {}
    for role, pubs in (("release", release), ("development", development)):
        for pub in pubs:
            raw = keys.raw_public(pub)
            entries[hashlib.sha256(raw).hexdigest()] = KeyEntry(
                public=base64.b64encode(raw).decode("ascii"), role=role
            )
    thresholds: dict[Role, int] = {"release": threshold}
    if any(e.role == "development" for e in entries.values()):
        thresholds["development"] = development_threshold or 1
    try:
        return TrustRoot(version=version, expires=expires, keys=entries, thresholds=thresholds)
    except pydantic.ValidationError as exc:
        raise errors.RootInvalid(f"cannot make root: {exc.errors()[0].get('msg')}") from None


def sign_root(
    root: TrustRoot, *, keys: Iterable[Ed25519PrivateKey], existing: dsse.Envelope | None = None
) -> dsse.Envelope:
    try:
        return dsse.sign(payload_type=ROOT_PAYLOAD_TYPE, payload=canonical_json(root), keys=keys, existing=existing)
    except dsse.EnvelopeError as exc:
        raise errors.RootInvalid(str(exc)) from None


def parse_root(data: bytes) -> tuple[TrustRoot, dsse.Envelope]:
    """Parse a root envelope (no signature check: see ``check_self_signed`` / ``verify_chain``)."""
    try:
        env = dsse.parse(data, max_bytes=MAX_ROOT_BYTES)
    except dsse.EnvelopeError as exc:
        raise errors.RootInvalid(f"root envelope: {exc}") from None
    if env.payload_type != ROOT_PAYLOAD_TYPE:
        raise errors.RootInvalid(f"root envelope has payload type {env.payload_type[:80]!r}")
    try:
        doc = loads_strict(env.payload)
        root = TrustRoot.model_validate(doc)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise errors.RootInvalid(f"root invalid at {where or '<root>'}: {first.get('msg')}") from None
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise errors.RootInvalid(f"root is not valid JSON: {exc}") from None
    return root, env


def count_valid(envelope: dsse.Envelope, root: TrustRoot, role: Role) -> set[str]:
    return dsse.valid_keyids(envelope, keys=root.public_keys(role))


def check_threshold(envelope: dsse.Envelope, root: TrustRoot, role: Role, *, what: str) -> set[str]:
    """Raise UnknownKey / SignatureInvalid / BelowThreshold unless ``role``'s threshold is met.

    The distinction matters to an operator: *unknown key* means "signed by someone this site
    does not trust" (wrong root or wrong channel), *signature invalid* means "tampered after
    signing", *below threshold* means "valid but not enough signers yet: run sign again".
    """
    k = root.threshold(role)
    known = root.public_keys(role)
    if k is None or not known:
        raise errors.UnknownKey(f"{what}: this trust root accepts no {role} keys")
    good = dsse.valid_keyids(envelope, keys=known)
    if len(good) >= k:
        return good
    signed_by_known = {s.keyid for s in envelope.signatures if s.keyid in known}
    if signed_by_known - good:
        raise errors.SignatureInvalid(
            f"{what}: signature by key {sorted(signed_by_known - good)[0][:16]} does not verify (edited after signing?)"
        )
    if not good:
        ids = ", ".join(s.keyid[:16] for s in envelope.signatures) or "none"
        raise errors.UnknownKey(f"{what}: no signature by a trusted {role} key (signed by: {ids})")
    raise errors.BelowThreshold(f"{what}: {len(good)} valid {role} signature(s), threshold is {k}")


def check_self_signed(root: TrustRoot, envelope: dsse.Envelope) -> None:
    try:
        check_threshold(envelope, root, "release", what=f"root v{root.version}")
    except errors.BundleError as exc:
        raise errors.RootInvalid(exc.message) from None


def load_root_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_ROOT_BYTES + 1)
    except OSError as exc:
        raise errors.RootInvalid(f"cannot read trust root {path}: {exc.strerror}") from None
    if len(data) > MAX_ROOT_BYTES:
        raise errors.RootInvalid(f"trust root {path} is over {MAX_ROOT_BYTES} bytes")
    return data


def load_root(path: Path) -> TrustRoot:
    """Load a site's root.json and check it is signed by its own release threshold.

    Expiry is not checked here: an expired root can still be rotated by a chain in a bundle.
    """
    root, env = parse_root(load_root_bytes(path))
    check_self_signed(root, env)
    return root


def save_root(path: Path, envelope_bytes: bytes) -> None:
    """Atomically replace ``path`` (temp file + fsync + rename + directory fsync)."""
    parse_root(envelope_bytes)
    _write_atomic(path, envelope_bytes)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` so that a crash or power loss leaves either the old or the new content:
    temp file in the same directory + fsync, rename over, then fsync the directory (the rename
    itself is only durable once the directory entry is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify_chain(
    trusted: TrustRoot, chain: Sequence[bytes], *, now: datetime | None = None, max_length: int = MAX_CHAIN
) -> TrustRoot:
    """Walk rotation links from ``trusted``; return the newest root (``trusted`` if the chain is empty).

    Links older than or equal to the trusted version are skipped (a bundle may carry the full
    history); each remaining link must be exactly the next version. The final root must not be
    expired at ``now``.
    """
    if len(chain) > max_length:
        raise errors.ChainTooLong(f"root chain has {len(chain)} links, the cap is {max_length}")
    current, _used = _walk(trusted, chain)
    if current.expires <= (now or now_utc()):
        raise errors.RootExpired(f"trust root v{current.version} expired at {current.expires.isoformat()}")
    return current


def _walk(trusted: TrustRoot, chain: Sequence[bytes]) -> tuple[TrustRoot, tuple[bytes, ...]]:
    """The newest root reached from ``trusted`` and the links that got there (no expiry check)."""
    current = trusted
    used: list[bytes] = []
    for i, link in enumerate(chain):
        try:
            new, env = parse_root(link)
        except errors.RootInvalid as exc:
            raise errors.ChainBroken(f"root chain link {i}: {exc.message}") from None
        if new.version <= current.version:
            continue
        if new.version != current.version + 1:
            raise errors.ChainBroken(
                f"root chain link {i}: version {new.version} does not follow {current.version}"
            )
        for signer, label in ((current, f"old root v{current.version}"), (new, f"new root v{new.version}")):
            try:
                check_threshold(env, signer, "release", what=f"root v{new.version} by {label} keys")
            except (errors.UnknownKey, errors.SignatureInvalid, errors.BelowThreshold) as exc:
                raise errors.ChainBroken(f"root chain link {i}: {exc.message}") from None
        current = new
        used.append(link)
    return current, tuple(used)


def parse_chain(data: bytes, *, max_length: int = MAX_CHAIN) -> tuple[bytes, ...]:
    """The links of a ``{"links": [<root envelope>, ...]}`` document, each as envelope bytes."""
    try:
        doc = loads_strict(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise errors.ChainBroken(f"root chain is not JSON: {exc}") from None
    links = doc.get("links") if isinstance(doc, dict) else None
    if not isinstance(links, list) or not all(isinstance(x, dict) for x in links):
        raise errors.ChainBroken("root chain must be {\"links\": [<root envelope>, ...]}")
    if len(links) > max_length:
        raise errors.ChainTooLong(f"root chain has {len(links)} links, the cap is {max_length}")
    return tuple(json.dumps(x, sort_keys=True, separators=(",", ":")).encode() for x in links)


def chain_json(links: Sequence[bytes]) -> bytes:
    """The ``{"links": [...]}`` document for ``links`` (envelope bytes), as :func:`parse_chain` reads it."""
    return json.dumps({"links": [json.loads(x) for x in links]}, sort_keys=True).encode()


# --- a site's effective root: seed + stored rotations ---------------------------------------------


@dataclass(frozen=True)
class Effective:
    """What a site trusts now. ``links`` are the stored rotations above the seed, in order, each
    verified from ``seed``; ``root`` is the last one's root (``seed`` when there are none)."""

    seed: TrustRoot
    root: TrustRoot
    links: tuple[bytes, ...]


def load_effective(seed_path: Path, chain_path: Path) -> Effective:
    """The seed at ``seed_path`` walked through the chain stored at ``chain_path`` (may be absent).

    Raises ``RootInvalid`` if the seed is unreadable or not self-signed, or if the stored chain is
    unreadable or does not walk from the seed (the message names the file and what to do).
    Expiry is not checked: a bundle's chain may still rotate an expired root (``verify_chain``
    checks the final root).
    """
    seed = load_root(seed_path)
    try:
        with open(chain_path, "rb") as fh:
            data = fh.read(MAX_STORED_CHAIN_BYTES + 1)
    except FileNotFoundError:
        return Effective(seed=seed, root=seed, links=())
    except OSError as exc:
        raise errors.RootInvalid(f"cannot read the stored trust chain {chain_path}: {exc.strerror}") from None
    try:
        if len(data) > MAX_STORED_CHAIN_BYTES:
            raise errors.ChainTooLong(f"it is over {MAX_STORED_CHAIN_BYTES} bytes")
        root, used = _walk(seed, parse_chain(data, max_length=MAX_STORED_LINKS))
    except (errors.ChainBroken, errors.ChainTooLong) as exc:
        raise errors.RootInvalid(
            f"stored trust chain {chain_path} does not chain from the seed root {seed_path} (v{seed.version}): "
            f"{exc.message}; remove it to trust the seed only, or install the newest root as the seed"
        ) from None
    return Effective(seed=seed, root=root, links=used)


def persist_rotation(effective: Effective, chain: Sequence[bytes], *, chain_path: Path) -> Effective:
    """Store the links of ``chain`` (a verified bundle's) that take ``effective`` higher; return the new state.

    The stored chain is rewritten whole (atomically: a power loss leaves the old or the new file)
    and re-walked from the seed before it is written, so it never holds a link that does not
    verify. Links at or below the effective version are ignored: the stored version never goes
    down, and a chain that adds nothing writes nothing.
    """
    links = list(effective.links)
    top = effective.root.version
    for link in chain:
        version = parse_root(link)[0].version
        if version > top:
            links.append(link)
            top = version
    if top == effective.root.version:
        return effective
    if len(links) > MAX_STORED_LINKS:
        raise errors.ChainTooLong(f"the stored chain would have {len(links)} links, the cap is {MAX_STORED_LINKS}")
    root, used = _walk(effective.seed, links)
    _write_atomic(chain_path, chain_json(used))
    return Effective(seed=effective.seed, root=root, links=used)
