#!/usr/bin/env python3
"""Fleet CA for the edgefleet broker: create the CA, issue broker/hub/site certificates, revoke.

Standalone on purpose (needs only the ``cryptography`` package, not edgefleet): it runs on the
operator's CA machine, which should be offline and is not the hub. The CA key never leaves it;
a site receives only its own certificate, its own key and the CA certificate.

    fleetca.py init   --dir fleet-ca/                            # sites and the broker
    fleetca.py init   --dir hub-ca/ --name "edgefleet hub CA"    # hub replicas only
    fleetca.py issue  --dir fleet-ca/ --kind broker --cn mqtt.example.net --san mqtt.example.net --out broker/
    fleetca.py issue  --dir fleet-ca/ --kind site   --cn store-0042 --out store-0042/
    fleetca.py issue  --dir hub-ca/   --kind hub    --cn hub-1.edgefleet --out hub-1/
    fleetca.py revoke --dir fleet-ca/ --cn store-0042            # rewrites fleet-ca/crl.pem (mosquitto: crlfile)
    fleetca.py acl    --listener sites > acl-sites
    fleetca.py acl    --listener hub   > acl-hub

Identities: the broker uses the certificate's CN as the MQTT username
(``use_identity_as_username``); on the sites listener also as the client id
(``use_username_as_clientid``), and the ACL grants a site its own topics by username. A site's
CN is its site id (``[a-z0-9-]``, at most 63). Hub replicas get certificates from a separate hub
CA, accepted only on the hub listener; their CN must end in ``.edgefleet`` (a dot cannot occur
in a site id, so the two kinds can never be confused in logs or in the store).

Exit codes: 0 ok, 2 usage, 3 bad input (existing files are never overwritten without --force),
4 CA missing or unreadable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HUB_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.edgefleet$")
TOPIC_ROOT = "edgefleet/v1/sites"
SITE_CHANNELS_OUT = ("status", "events", "online", "replies")

EXIT_USAGE, EXIT_INPUT, EXIT_CA = 2, 3, 4


class CAError(Exception):
    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


def _write(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    if path.exists() and not force:
        raise CAError(f"{path} exists; refusing to overwrite (use --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, fmt, serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(directory: Path, *, name: str = "edgefleet fleet CA", days: int = 3650, force: bool = False) -> Path:
    """Create ``ca.key`` (0600) and ``ca.crt`` in ``directory``; return the certificate path."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / "ca.key", _key_pem(key), mode=0o600, force=force)
    _write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), mode=0o644, force=force)
    _write(directory / "index.json", b"{}", mode=0o644, force=True)
    return directory / "ca.crt"


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CAError(f"cannot load the CA from {directory}: {exc}", EXIT_CA) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{directory / 'ca.key'} is not an EC private key", EXIT_CA)
    return cert, key


def _index(directory: Path) -> dict[str, list[dict[str, object]]]:
    try:
        data = json.loads((directory / "index.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CAError(f"{directory / 'index.json'} is unreadable: {exc}", EXIT_CA) from None
    return data if isinstance(data, dict) else {}


def issue(
    ca_dir: Path, *, cn: str, kind: str, out_dir: Path, sans: tuple[str, ...] = (), days: int = 825,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue a certificate for ``cn``; write ``<cn>.crt``, ``<cn>.key`` (0600) and a copy of
    ``ca.crt`` into ``out_dir``. Returns (certificate, key)."""
    if kind == "site" and not SITE_RE.match(cn):
        raise CAError(f"site id {cn!r} is invalid: lowercase letters, digits and '-', at most 63")
    if kind == "hub" and not HUB_RE.match(cn):
        raise CAError(f"hub identity {cn!r} is invalid: it must look like 'hub-1.edgefleet'")
    if kind == "broker" and not sans:
        raise CAError("a broker certificate needs at least one --san (the host name or IP the sites connect to)")
    if kind not in ("site", "hub", "broker"):
        raise CAError(f"unknown kind {kind!r}: site, hub or broker")
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        names: list[x509.GeneralName] = []
        for san in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    crt_path, key_path = out_dir / f"{cn}.crt", out_dir / f"{cn}.key"
    _write(key_path, _key_pem(key), mode=0o600, force=force)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, force=force)
    _write(out_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644, force=True)
    index = _index(ca_dir)
    index.setdefault(cn, []).append(
        {"serial": str(cert.serial_number), "kind": kind, "not_after": cert.not_valid_after_utc.isoformat()}
    )
    _write(ca_dir / "index.json", json.dumps(index, indent=1, sort_keys=True).encode(), mode=0o644, force=True)
    return crt_path, key_path


def revoke(ca_dir: Path, *, cn: str | None = None, days: int = 30) -> Path:
    """Mark every certificate issued to ``cn`` revoked and (re)write ``crl.pem``; with no
    ``cn`` just re-sign the CRL (do so before ``days`` pass: mosquitto refuses an expired CRL)."""
    ca_cert, ca_key = _load_ca(ca_dir)
    index = _index(ca_dir)
    if cn is not None:
        if cn not in index:
            raise CAError(f"no certificate was issued to {cn!r} by this CA")
        for entry in index[cn]:
            entry.setdefault("revoked", _now().isoformat())
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
    )
    for entries in index.values():
        for entry in entries:
            if "revoked" in entry:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(str(entry["serial"])))
                    .revocation_date(dt.datetime.fromisoformat(str(entry["revoked"])))
                    .build()
                )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(ca_dir / "index.json", json.dumps(index, indent=1, sort_keys=True).encode(), mode=0o644, force=True)
    _write(ca_dir / "crl.pem", crl.public_bytes(serialization.Encoding.PEM), mode=0o644, force=True)
    return ca_dir / "crl.pem"


def acl(listener: str) -> str:
    """The ACL file of the ``sites`` or the ``hub`` listener (see mosquitto.conf)."""
    header = [
        f"# edgefleet broker ACL, {listener} listener (generated by fleetca.py acl; see docs/protocol.md).",
        "# The MQTT username is the client certificate's CN (use_identity_as_username).",
        "",
    ]
    if listener == "sites":
        lines = ["# Every site (CN = site id): publish only its own channels, read only its own commands."]
        lines += [f"pattern write {TOPIC_ROOT}/%u/{channel}" for channel in SITE_CHANNELS_OUT]
        lines += [f"pattern read {TOPIC_ROOT}/%u/commands"]
    elif listener == "hub":
        lines = [
            "# Every client of this listener holds a hub-CA certificate: read what sites publish, write commands.",
            *(f"pattern read {TOPIC_ROOT}/+/{channel}" for channel in SITE_CHANNELS_OUT),
            f"pattern write {TOPIC_ROOT}/+/commands",
        ]
    else:
        raise CAError(f"unknown listener {listener!r}: sites or hub")
    return "\n".join(header + lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetca.py", description="edgefleet fleet CA for the MQTT broker")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="create the fleet CA")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--name", default="edgefleet fleet CA")
    p.add_argument("--days", type=int, default=3650)
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("issue", help="issue a site, hub or broker certificate")
    p.add_argument("--dir", type=Path, required=True, help="the CA directory")
    p.add_argument("--kind", choices=["site", "hub", "broker"], required=True)
    p.add_argument("--cn", required=True, help="site id, hub identity (hub-1.edgefleet) or broker name")
    p.add_argument("--san", action="append", default=[], help="broker: DNS name or IP (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--days", type=int, default=825)
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("revoke", help="revoke a CN's certificates and write crl.pem")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--cn")
    p.add_argument("--days", type=int, default=30, help="CRL validity")
    p = sub.add_parser("acl", help="print the ACL file of a broker listener")
    p.add_argument("--listener", choices=["sites", "hub"], required=True)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "init":
            print(init_ca(args.dir, name=args.name, days=args.days, force=args.force))
        elif args.cmd == "issue":
            crt, key = issue(
                args.dir, cn=args.cn, kind=args.kind, out_dir=args.out, sans=tuple(args.san), days=args.days,
                force=args.force,
            )
            print(crt)
            print(key)
        elif args.cmd == "revoke":
            print(revoke(args.dir, cn=args.cn, days=args.days))
        else:
            print(acl(args.listener), end="")
    except CAError as exc:
        print(f"fleetca: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
