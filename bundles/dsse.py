"""DSSE envelopes (https://github.com/secure-systems-lab/dsse) signed with Ed25519.

Both bundles (manifest) and hub commands travel as DSSE envelopes. The signature covers
PAE(payloadType, payload), never the JSON around it, so re-encoding the envelope cannot
change what was signed, and the payload type binds a signature to its purpose: a command
signature can never be replayed as a bundle signature.

Key ids are the lowercase hex sha256 of the raw 32-byte Ed25519 public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAX_SIGNATURES = 32


class EnvelopeError(ValueError):
    """The envelope is not well-formed DSSE (bad JSON, base64, fields or sizes)."""


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self) -> bytes:
        doc = {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in self.signatures
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def pae(payload_type: str, payload: bytes) -> bytes:
    """Pre-authentication encoding: what is actually signed."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def keyid_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(
    *, payload_type: str, payload: bytes, keys: Iterable[Ed25519PrivateKey], existing: Envelope | None = None
) -> Envelope:
    """Sign (or add signatures to an existing envelope of the same payload).

    Adding to an existing envelope is how k-of-n signing happens on separate machines:
    each holder appends their signature to the envelope without touching the payload.
    """
    sigs = list(existing.signatures) if existing else []
    if existing and (existing.payload_type != payload_type or existing.payload != payload):
        raise EnvelopeError("cannot add a signature: the envelope carries a different payload")
    message = pae(payload_type, payload)
    for key in keys:
        kid = keyid_of(key.public_key())
        sigs = [s for s in sigs if s.keyid != kid]
        sigs.append(Signature(keyid=kid, sig=key.sign(message)))
    return Envelope(payload_type=payload_type, payload=payload, signatures=tuple(sigs))


def parse(data: bytes, *, max_bytes: int) -> Envelope:
    """Parse an envelope, refusing anything over ``max_bytes`` before decoding it."""
    if len(data) > max_bytes:
        raise EnvelopeError(f"envelope is {len(data)} bytes, over the {max_bytes}-byte cap")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise EnvelopeError(f"envelope is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("envelope is not a JSON object")
    payload_type = doc.get("payloadType")
    payload_b64 = doc.get("payload")
    raw_sigs = doc.get("signatures")
    if not isinstance(payload_type, str) or not isinstance(payload_b64, str):
        raise EnvelopeError("envelope lacks a string payloadType or payload")
    if not isinstance(raw_sigs, list) or len(raw_sigs) > MAX_SIGNATURES:
        raise EnvelopeError(f"envelope signatures must be a list of at most {MAX_SIGNATURES}")
    try:
        payload = base64.b64decode(payload_b64, validate=True)
        sigs = []
        for item in raw_sigs:
            if not isinstance(item, dict) or not isinstance(item.get("sig"), str):
                raise EnvelopeError("envelope signature entry is malformed")
            keyid = item.get("keyid", "")
            if not isinstance(keyid, str):
                raise EnvelopeError("envelope signature keyid is not a string")
            sigs.append(Signature(keyid=keyid, sig=base64.b64decode(item["sig"], validate=True)))
    except (binascii.Error, ValueError) as exc:
        if isinstance(exc, EnvelopeError):
            raise
        raise EnvelopeError(f"envelope has invalid base64: {exc}") from None
    return Envelope(payload_type=payload_type, payload=payload, signatures=tuple(sigs))


def valid_keyids(envelope: Envelope, *, keys: Mapping[str, Ed25519PublicKey]) -> set[str]:
    """Return the key ids (among ``keys``) whose signature over the envelope verifies.

    Unknown key ids and bad signatures are simply not counted; the caller decides whether
    the count meets its threshold. A key id is counted once however often it appears.
    """
    message = pae(envelope.payload_type, envelope.payload)
    good: set[str] = set()
    for s in envelope.signatures:
        key = keys.get(s.keyid)
        if key is None or s.keyid in good:
            continue
        try:
            key.verify(s.sig, message)
        except InvalidSignature:
            continue
        good.add(s.keyid)
    return good
