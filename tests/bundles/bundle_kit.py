"""Helpers for the bundle tests: keys, roots, and a kit that builds small synthetic bundles."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundles import container, dsse, keys, manifest, pack, trust

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)

NS_YAML = b"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n"
DEPLOY_YAML = (
    b"apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n"
    b"  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n"
    b"    spec:\n      containers: [{name: web, image: 'nginx:1.27'}]\n"
    b"---\n---\napiVersion: v1\nkind: ConfigMapList\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n"
    b"- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}, data: {op: =}}\n"
)


def snapshot(path: Path) -> dict[str, str]:
    """Every entry under ``path`` with a content hash: 'unchanged' means byte-for-byte unchanged."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def link(
    old_keys: list[Ed25519PrivateKey], new_keys: list[Ed25519PrivateKey], *, version: int, threshold: int = 2,
    signers: list[Ed25519PrivateKey] | None = None, expires: dt.datetime | None = None,
) -> bytes:
    """A rotation link: root ``version`` listing ``new_keys``, signed by old and new council (or ``signers``)."""
    root = trust.make_root(
        release=[k.public_key() for k in new_keys], threshold=threshold, version=version,
        expires=expires or NOW + dt.timedelta(days=365),
    )
    signers = signers if signers is not None else [*old_keys[:2], *new_keys[:threshold]]
    return trust.sign_root(root, keys=signers).to_json()


@dataclass
class Kit:
    tmp: Path
    release_keys: list[Ed25519PrivateKey] = field(default_factory=lambda: [keys.generate() for _ in range(3)])
    threshold: int = 2

    def __post_init__(self) -> None:
        self.root = trust.make_root(
            release=[k.public_key() for k in self.release_keys], threshold=self.threshold,
            expires=NOW + dt.timedelta(days=365),
        )
        self.root_bytes = trust.sign_root(self.root, keys=self.release_keys[: self.threshold]).to_json()
        self.store = self.tmp / "store"
        self.store.mkdir()
        (self.store / "older-bundle").mkdir()
        (self.store / "older-bundle" / "keep.txt").write_text("previous content must survive")
        self._n = 0

    def files(self, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
        files = {"demo/001-namespace.yaml": NS_YAML, "demo/002-web.yaml": DEPLOY_YAML}
        files.update(extra or {})
        return files

    def manifest(self, files: dict[str, bytes], **over: Any) -> manifest.Manifest:
        entries = tuple(
            manifest.FileEntry(path=p, size=len(b), sha256=hashlib.sha256(b).hexdigest(), mode=0o644)
            for p, b in files.items()
        )
        yaml_files = tuple(p for p in files if p.startswith("demo/"))
        fields: dict[str, Any] = {
            "name": "demo", "version": "1.2.3", "release": 5, "created": NOW, "expires": NOW + dt.timedelta(days=30),
            "compression": "zstd", "files": entries,
            "components": (manifest.Component(
                name="demo", layer=0, tier=1, namespace="demo", files=yaml_files,
                health_checks=(manifest.HealthCheck(type="deployment-available", name="web", namespace="demo"),),
                source=manifest.Source(type="files"),
            ),),
            "tiers": {1: manifest.TierPolicy(priority_class_name="platform-infrastructure", spread=True)},
        }
        fields.update(over)
        return manifest.Manifest(**fields)

    def envelope(self, m: manifest.Manifest, signers: list[Ed25519PrivateKey] | None = None) -> bytes:
        signers = self.release_keys[: self.threshold] if signers is None else signers
        return dsse.sign(payload_type=manifest.PAYLOAD_TYPE, payload=manifest.canonical_json(m), keys=signers).to_json()

    def bundle(
        self,
        files: dict[str, bytes] | None = None,
        *,
        signers: list[Ed25519PrivateKey] | None = None,
        chain: list[bytes] | None = None,
        **over: Any,
    ) -> Path:
        """A well-formed bundle written with the production writer."""
        files = self.files() if files is None else files
        m = self.manifest(files, **over)
        src = self.tmp / f"src-{self._n}"
        src.mkdir()
        sources = {}
        for p, b in files.items():
            q = src / p.replace("/", "__")
            q.write_bytes(b)
            sources[p] = q
        self._n += 1
        out = self.tmp / f"bundle-{self._n}.efb"
        signers = self.release_keys[: self.threshold] if signers is None else signers
        pack.write_bundle(out, manifest=m, sources=sources, keys=signers, chain=chain or ())
        return out

    def raw(
        self,
        members: list[tuple[str, bytes] | tuple[str, bytes, bytes] | bytes],
        *,
        compression: str = "zstd",
        end: bytes = b"\x00" * 1024,
        trailer: bytes = b"",
    ) -> Path:
        """A hand-crafted archive: (name, data[, typeflag]) members or raw header/data bytes."""
        buf = io.BytesIO()
        for m in members:
            if isinstance(m, bytes):
                buf.write(m)
                continue
            name, data = m[0], m[1]
            flag = m[2] if len(m) == 3 else b"0"  # type: ignore[misc]
            buf.write(_header(name, len(data), typeflag=flag))
            buf.write(data + b"\x00" * container.padding(len(data)))
        buf.write(end)
        buf.write(trailer)
        data = buf.getvalue()
        if compression == "zstd":
            data = zstandard.ZstdCompressor(write_checksum=True).compress(data)
        self._n += 1
        out = self.tmp / f"raw-{self._n}.efb"
        out.write_bytes(data)
        return out

    def members(self, files: dict[str, bytes] | None = None, **over: Any) -> list[tuple[str, bytes]]:
        """The members of a valid bundle (to be tampered with before ``raw``)."""
        files = self.files() if files is None else files
        env = self.envelope(self.manifest(files, **over))
        return [(container.ENVELOPE_NAME, env), *((container.PAYLOAD_PREFIX + p, b) for p, b in files.items())]


def _header(name: str, size: int, *, typeflag: bytes = b"0") -> bytes:
    """Like container.make_header but allowing names the writer would refuse (absolute, long)."""
    raw = name.encode()
    block = bytearray(container.BLOCK)
    block[0 : min(100, len(raw))] = raw[:100]
    block[100:108] = b"0000644\x00"
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"00000000000\x00"
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[257:263] = b"ustar\x00"
    block[263:265] = b"00"
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)
