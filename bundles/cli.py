"""``edgefleet-bundle``: keygen, build, sign, verify, inspect, rotate-root.

Human-readable output by default, ``--json`` for machines. Every failure is one line on stderr,
``edgefleet-bundle: <reason>: <message>``, and exits with the failure class's code
(``bundles.errors``; 2 for usage errors, 1 for anything unexpected).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bundles import build, container, dsse, errors, keys, pack, split, trust, verify
from bundles import images as bundle_images
from bundles.manifest import Manifest, now_utc


def _platform_default(sub: str) -> Path | None:
    env = os.environ.get("EDGEFLEET_PLATFORM_DIR")
    base = Path(env) if env else Path.cwd().parent / "shared" / "platform"
    path = base / sub
    return path if path.exists() else None


def _when(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise errors.UsageError(f"{text!r} is not an ISO 8601 date/time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _out(args: argparse.Namespace, data: dict[str, Any], human: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if args.json else human)


def _components_table(m: Manifest) -> str:
    lines = [f"  {'L':<2}{'T':<3}{'component':<20}{'files':>6}{'checks':>7}{'images':>7}  status"]
    for c in m.install_order():
        pin = f" ({c.source.helm.chart} {c.source.helm.version})" if c.source.helm else ""
        status = "ok" if c.rendered else f"needs {', '.join(c.needs)}{pin}"
        if c.rendered and c.partial:
            status = "partial: " + "; ".join(c.partial)
        counts = f"{len(c.files):>6}{len(c.health_checks):>7}{len(c.images):>7}"
        lines.append(f"  {c.layer:<2}{c.tier:<3}{c.name:<20}{counts}  {status}")
    return "\n".join(lines)


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "name": m.name,
        "version": m.version,
        "release": m.release,
        "channel": m.channel,
        "created": m.created.isoformat(),
        "expires": m.expires.isoformat(),
        "compression": m.compression,
        "files": len(m.files),
        "payloadBytes": m.payload_bytes,
        "components": [
            {
                "name": c.name, "layer": c.layer, "tier": c.tier, "rendered": c.rendered, "needs": list(c.needs),
                "partial": list(c.partial), "files": len(c.files), "healthChecks": len(c.health_checks),
                "images": list(c.images), "dependsOn": list(c.depends_on),
            }
            for c in m.install_order()
        ],
        "needsHelm": [c.name for c in m.components if not c.rendered],
        "base": m.base.model_dump() if m.base else None,  # a delta bundle needs this bundle on the site
        "imageBlobs": sum(1 for f in m.files if f.path.startswith(bundle_images.IMAGES_DIR + "/blobs/")),
    }


# --- commands --------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    priv, pub, keyid = keys.keygen(Path(args.out), args.name, overwrite=args.force)
    _out(args, {"private": str(priv), "public": str(pub), "keyid": keyid},
         f"wrote {priv} (0600) and {pub}\nkeyid {keyid}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    platform = Path(args.platform) if args.platform else _platform_default("idp-blueprint")
    if platform is None:
        raise errors.UsageError("no --platform given and no platform data found (set EDGEFLEET_PLATFORM_DIR)")
    mirror = None if args.no_mirror else (Path(args.mirror) if args.mirror else _platform_default("mirror"))
    signing = [keys.load_private(Path(k)) for k in args.key]
    chain = [trust.load_root_bytes(Path(p)) for p in args.root_chain]
    for link in chain:
        trust.parse_root(link)
    image_opts = _image_options(args)
    result = build.build(
        profile=Path(args.profile), platform=platform, mirror=mirror, out=Path(args.out), version=args.version,
        release=args.release, keys=signing, allow_unrendered=args.allow_unrendered,
        prefer_mirror=args.prefer_mirror,
        compression=args.compression, channel=args.channel, level=args.zstd_level,
        expires=now_utc() + timedelta(days=args.expires_days) if args.expires_days else None,
        images=image_opts,
    )
    if chain:
        pack.attach_chain(result.path, chain)
    bundle_size = result.path.stat().st_size
    parts = split.split(result.path, max_part_size=args.max_part_size)
    m = result.manifest
    human = (
        f"built {result.path} ({result.path.stat().st_size} bytes, {m.compression}): {m.label()} release {m.release}, "
        f"{len(m.components)} components, {len(m.files)} files, {result.object_count} objects, "
        f"{m.payload_bytes} payload bytes, {len(signing)} signature(s)\n{_components_table(m)}"
    )
    if result.needs_helm:
        human += f"\nneeds helm (carried pinned, unrendered): {', '.join(result.needs_helm)}"
    image_files = [f for f in m.files if f.path.startswith(bundle_images.IMAGES_DIR + "/blobs/")]
    if image_opts is not None:
        human += f"\nimages: {len(image_files)} blobs, {sum(f.size for f in image_files)} bytes"
        if m.base is not None:
            human += f" (delta on {m.base.name}-{m.base.version} release {m.base.release})"
    elif not args.without_images and any(c.images for c in m.components):
        refs = sorted({i for c in m.components for i in c.images})
        print(f"edgefleet-bundle: note: {len(refs)} container image(s) referenced but not carried "
              "(no --images-from; --without-images silences this)", file=sys.stderr)
    if len(parts) > 1:
        human += (f"\nsplit into {len(parts) - 1} parts of at most {args.max_part_size} bytes "
                  f"({result.path} is the index)")
    _out(args, {"path": str(result.path), "objects": result.object_count, "signatures": len(signing),
                "bundleBytes": bundle_size, "parts": [str(p) for p in parts[1:]],
                "imageBlobs": len(image_files), **_summary(m)}, human)
    return 0


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4000M, 2G)") from None


def _image_options(args: argparse.Namespace) -> bundle_images.Options | None:
    if args.images_from and args.without_images:
        raise errors.UsageError("--images-from and --without-images exclude each other")
    if args.base and not args.images_from:
        raise errors.UsageError("--base makes a delta of the image blobs: it needs --images-from")
    if not args.images_from:
        return None
    arches = tuple(args.arch) if args.arch else build.load_profile(Path(args.profile)).compat.architectures
    return bundle_images.Options(source=args.images_from, arches=arches, base=Path(args.base) if args.base else None,
                                 registry_tls_verify=not args.registry_insecure)


def cmd_sign(args: argparse.Namespace) -> int:
    signing = [keys.load_private(Path(k)) for k in args.key]
    target = Path(args.file)
    out = Path(args.out) if args.out else None
    if split.is_split(target):
        raise errors.UsageError(f"{target} is a split bundle: `edgefleet-bundle join` it, sign, then `split` again")
    if _is_root(target):
        root, env = trust.parse_root(trust.load_root_bytes(target))
        new = trust.sign_root(root, keys=signing, existing=env)
        trust.save_root(out or target, new.to_json())
        what = f"root v{root.version}"
    else:
        new = pack.sign_bundle(target, keys=signing, out=out)
        what = "bundle"
    ids = [s.keyid for s in new.signatures]
    _out(args, {"file": str(out or target), "signatures": ids},
         f"signed {what} {out or target}: now {len(ids)} signature(s): {', '.join(i[:16] for i in ids)}")
    return 0


def _is_root(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(1) == b"{"
    except OSError as exc:
        raise errors.Unreadable(f"cannot read {path}: {exc.strerror}") from None


def cmd_split(args: argparse.Namespace) -> int:
    target = Path(args.bundle)
    if split.is_split(target):
        raise errors.UsageError(f"{target} is already split")
    parts = split.split(target, max_part_size=args.max_part_size)
    _out(args, {"index": str(target), "parts": [str(p) for p in parts[1:]]},
         f"{target}: {len(parts) - 1} parts" if len(parts) > 1 else f"{target} fits in one part: unchanged")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    out = split.join(Path(args.index), Path(args.out))
    _out(args, {"path": str(out), "bytes": out.stat().st_size}, f"joined {args.index} into {out} (every part checked)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.trust_chain:
        root = trust.load_effective(Path(args.root), Path(args.trust_chain)).root
    else:
        root = trust.load_root(Path(args.root))
    common: dict[str, Any] = {
        "root": root,
        "min_release": args.min_release,
        "min_created": _when(args.min_created) if args.min_created else None,
        "now": _when(args.now) if args.now else None,
        "kubernetes_version": args.kubernetes_version,
        "arch": args.arch,
    }
    if args.store:
        res: verify.Verified = verify.verify_and_stage(args.bundle, store_dir=Path(args.store), **common)
    else:
        res = verify.verify_only(args.bundle, **common)
    m = res.manifest
    data = {"ok": True, "bundleId": res.bundle_id, "signers": sorted(res.signers), "rootVersion": res.root.version,
            "rootRotated": res.root_rotated, **_summary(m)}
    human = (
        f"OK {m.label()} release {m.release}: {len(res.signers)} valid signature(s) of threshold "
        f"{res.root.threshold(m.channel)}, {len(m.files)} files / {m.payload_bytes} bytes verified\n"
        f"bundle id {res.bundle_id}, trust root v{res.root.version}"
    )
    if isinstance(res, verify.StagedBundle):
        data["staged"] = str(res.path)
        human += f"\nstaged at {res.path}"
    if res.root_rotated:
        human += f"\ntrust root rotated to v{res.root.version} by the chain in the bundle"
    _out(args, data, human)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    m, env, chain, compression = pack.load_manifest(Path(args.bundle))
    data = {"verified": False, "signatures": [s.keyid for s in env.signatures], "rootChainLinks": len(chain),
            "container": compression, **_summary(m)}
    human = (
        f"{m.label()} release {m.release} ({m.channel}) - NOT VERIFIED (use `verify`)\n"
        f"created {m.created.isoformat()}  expires {m.expires.isoformat()}\n"
        f"kubernetes {m.compat.kubernetes.min}-{m.compat.kubernetes.max}, arch {', '.join(m.compat.architectures)}, "
        f"container {compression}\n"
        f"{len(env.signatures)} signature(s): {', '.join(s.keyid[:16] for s in env.signatures) or 'none'}; "
        f"root chain links: {len(chain)}\n"
        f"{len(m.files)} files, {m.payload_bytes} payload bytes\n"
        + (f"delta: needs base bundle {m.base.name}-{m.base.version} (release {m.base.release}) on the site\n"
           if m.base else "")
        + "tiers: " + "; ".join(
            f"{t}: {p.priority_class_name}{' +cp' if p.tolerate_control_plane else ''}{' spread' if p.spread else ''}"
            for t, p in sorted(m.tiers.items())
        ) + "\n" + _components_table(m)
    )
    if args.files:
        human += "\n" + "\n".join(f"  {f.mode:o} {f.size:>10} {f.sha256[:16]} {f.path}" for f in m.files)
        data["fileList"] = [f.model_dump(by_alias=True) for f in m.files]
    _out(args, data, human)
    return 0


def cmd_rotate_root(args: argparse.Namespace) -> int:
    release = [keys.load_public(Path(p)) for p in args.release_key]
    development = [keys.load_public(Path(p)) for p in args.development_key]
    signing = [keys.load_private(Path(p)) for p in args.sign_key]
    version = 1
    old: trust.TrustRoot | None = None
    if args.old:
        old = trust.load_root(Path(args.old))
        version = old.version + 1
    new = trust.make_root(
        release=release, threshold=args.threshold, expires=now_utc() + timedelta(days=args.expires_days),
        version=version, development=development, development_threshold=args.development_threshold,
    )
    env = trust.sign_root(new, keys=signing)
    out = Path(args.out)
    trust.save_root(out, env.to_json())
    status = "initial root"
    if old is not None:
        try:
            trust.verify_chain(old, [env.to_json()])
            status = f"rotation v{old.version} -> v{version} verifies"
        except (errors.ChainBroken, errors.RootExpired) as exc:
            status = (
                f"rotation v{old.version} -> v{version} is NOT complete yet ({exc.message}); "
                "add signatures with `sign`"
            )
    else:
        try:
            trust.check_self_signed(new, env)
        except errors.RootInvalid as exc:
            status = f"initial root is NOT complete yet ({exc.message}); add signatures with `sign`"
    _out(args, {"path": str(out), "version": version, "keys": sorted(new.keys), "thresholds": new.thresholds,
                "signatures": [s.keyid for s in env.signatures], "status": status},
         f"wrote {out}: root v{version}, {len(new.keys)} key(s), thresholds {new.thresholds}; {status}")
    return 0


# --- wiring ----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        self.exit(2, f"{self.prog}: usage: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgefleet-bundle", description="Build, sign and verify edgefleet offline bundles.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    # --json is accepted before or after the subcommand.
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("keygen", parents=[common], help="generate an Ed25519 signing key pair")
    s.add_argument("--out", default=".", help="directory for NAME.key (0600) and NAME.pub")
    s.add_argument("--name", default="release")
    s.add_argument("--force", action="store_true", help="overwrite existing key files")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("build", parents=[common], help="build a bundle from profile, platform source and mirror")
    s.add_argument("--profile", default=str(build.DEFAULT_PROFILE))
    s.add_argument("--platform", help="platform source (default $EDGEFLEET_PLATFORM_DIR/idp-blueprint)")
    s.add_argument("--mirror", help="offline mirror (default $EDGEFLEET_PLATFORM_DIR/mirror if present)")
    s.add_argument("--no-mirror", action="store_true")
    s.add_argument("--out", required=True)
    s.add_argument("--version", default="0.1.0", help="semver of the bundle")
    s.add_argument("--release", type=int, required=True, help="monotonic release counter (anti-rollback)")
    s.add_argument("--key", action="append", default=[], help="private key to sign with (repeatable)")
    s.add_argument("--allow-unrendered", action="store_true",
                   help="carry helm-only components pinned but unrendered instead of failing")
    s.add_argument("--prefer-mirror", action="store_true",
                   help="use the mirror's pre-rendered manifests even where helm could render the chart")
    s.add_argument("--compression", choices=["zstd", "none"], default="zstd")
    s.add_argument("--zstd-level", type=int, default=container.ZSTD_LEVEL, choices=range(1, 20), metavar="1-19")
    s.add_argument("--channel", choices=["release", "development"], default="release")
    s.add_argument("--expires-days", type=int, help="override the profile's expiry")
    s.add_argument("--root-chain", action="append", default=[],
                   help="root rotation link to ship (repeatable, in order)")
    s.add_argument("--images-from", metavar="oci:DIR|registry",
                   help="carry the referenced container images, from an OCI layout or (skopeo) their registries")
    s.add_argument("--without-images", action="store_true", help="build without container images (the default)")
    s.add_argument("--arch", action="append", default=[],
                   help="bundle architecture (repeatable; default: the profile's); images are filtered to it")
    s.add_argument("--base", metavar="OLD.efb", help="delta bundle: leave out image blobs OLD.efb carries")
    s.add_argument("--registry-insecure", action="store_true",
                   help="--images-from registry: plain HTTP / no TLS verification for the source registries")
    s.add_argument("--max-part-size", type=_size, default=split.DEFAULT_MAX_PART,
                   help="split the bundle into parts of at most this size (default just under 4 GiB, FAT32)")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("sign", parents=[common], help="add signatures to a bundle (or to a root.json)")
    s.add_argument("file")
    s.add_argument("--key", action="append", required=True)
    s.add_argument("--out", help="write here instead of replacing the file")
    s.set_defaults(func=cmd_sign)

    s = sub.add_parser("verify", parents=[common], help="verify a bundle (and stage it with --store)")
    s.add_argument("bundle")
    s.add_argument("--root", required=True, help="trust root (root.json; on a site: the seed)")
    s.add_argument("--trust-chain", help="a site's stored rotations (/var/lib/edgefleet/trust/root-chain.json): "
                   "verify against the effective root, as the agent does")
    s.add_argument("--store", help="bundle store to stage into")
    s.add_argument("--min-release", type=int, default=0)
    s.add_argument("--min-created", help="ISO time of the newest bundle seen")
    s.add_argument("--now", help="ISO time to check expiry against (default: the system clock)")
    s.add_argument("--kubernetes-version")
    s.add_argument("--arch")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("split", parents=[common], help="split a bundle into parts (FAT32: just under 4 GiB each)")
    s.add_argument("bundle")
    s.add_argument("--max-part-size", type=_size, default=split.DEFAULT_MAX_PART)
    s.set_defaults(func=cmd_split)

    s = sub.add_parser("join", parents=[common], help="reassemble a split bundle into one file, checking every part")
    s.add_argument("index", help="the split bundle (its index file)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_join)

    s = sub.add_parser("inspect", parents=[common], help="show what a bundle contains (no trust decisions)")
    s.add_argument("bundle")
    s.add_argument("--files", action="store_true", help="list every payload file")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("rotate-root", parents=[common], help="create the initial root.json or the next rotation link")
    s.add_argument("--old", help="current root.json (omit to create version 1)")
    s.add_argument("--release-key", action="append", required=True, help="public key of the new root (repeatable)")
    s.add_argument("--development-key", action="append", default=[])
    s.add_argument("--threshold", type=int, required=True)
    s.add_argument("--development-threshold", type=int)
    s.add_argument("--expires-days", type=int, default=365)
    s.add_argument("--sign-key", action="append", default=[], help="private key(s) signing the new root")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_rotate_root)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except errors.BundleError as exc:
        print(f"edgefleet-bundle: {exc.reason}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except dsse.EnvelopeError as exc:
        print(f"edgefleet-bundle: {errors.EnvelopeInvalid.reason}: {exc}", file=sys.stderr)
        return errors.EnvelopeInvalid.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, never a traceback for an operator
        print(f"edgefleet-bundle: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
