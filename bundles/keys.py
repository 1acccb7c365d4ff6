"""Ed25519 signing keys on disk: private keys as unencrypted PKCS#8 PEM (mode 0600), public as SPKI PEM.

Why unencrypted: signing happens on an offline build machine or from a hardware-backed secret
store that hands the PEM over a pipe; a passphrase prompt would break scripted k-of-n signing.
The private file is created with O_EXCL and mode 0600 from the start (never chmod afterwards: a
window where the key is world-readable is a leak).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bundles import dsse, errors


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def keygen(out_dir: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write ``<name>.key`` (0600) and ``<name>.pub`` into ``out_dir``; return (key, pub, keyid)."""
    key = generate()
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL) | getattr(os, "O_NOFOLLOW", 0)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.KeyInvalid(f"cannot create key directory {out_dir}: {exc.strerror}") from None
    try:
        fd = os.open(priv_path, flags, 0o600)
    except FileExistsError:
        raise errors.KeyInvalid(f"{priv_path} already exists (refusing to overwrite a key)") from None
    except OSError as exc:
        raise errors.KeyInvalid(f"cannot create key file {priv_path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem(key))
            fh.flush()
            os.fsync(fh.fileno())
        pub_path.write_bytes(public_pem(key.public_key()))
    except OSError as exc:
        raise errors.KeyInvalid(f"cannot write key files {priv_path} / {pub_path}: {exc.strerror}") from None
    return priv_path, pub_path, dsse.keyid_of(key.public_key())


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise errors.KeyInvalid(f"cannot read private key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise errors.KeyInvalid(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise errors.KeyInvalid(f"{path} is not an Ed25519 private key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    """Accept a public key PEM, or a private key PEM (its public half)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise errors.KeyInvalid(f"cannot read key {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        return load_private(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise errors.KeyInvalid(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise errors.KeyInvalid(f"{path} is not an Ed25519 public key")
    return key


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)
