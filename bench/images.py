"""Benchmark: push a bundle's images to a local registry vs ``skopeo copy`` of the same OCI layout.

    .venv/bin/python bench/images.py [--size-mib 512] [--images 4] [--layers 4] [--runs 1]

Builds ``--images`` synthetic images (``--layers`` incompressible layers each, ``--size-mib`` in
total) into an OCI layout, builds and stages a signed bundle carrying them, then, each into a
fresh docker-registry (Debian's distribution registry on a free loopback port):

(a) the agent's ``registry`` loader: push + verify every manifest by digest;
(b) ``skopeo copy --all oci:<staged layout>:<ref> docker://...`` for every image, one after the other
    (skopeo copies an image's layers in parallel itself).

Prints both times (best of ``--runs``), the ratio (a)/(b) (target <= 1.2), and for a second version
with one changed image the size of the delta bundle (``--base``) as a fraction of the full bundle.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.imageload import registry as pusher
from bundles import build, keys, oci, trust, verify
from bundles import images as bundle_images

MiB = 1 << 20


def _layer_blob(layout: Path, seed: int, size: int) -> tuple[oci.Descriptor, str]:
    """A gzip'd tar layer of ``size`` random bytes, written straight to its blob (bounded memory).

    gzip level 1 like most image builders' fast paths; random bytes do not compress, so the blob
    size is the layer size. Content is random per run: v2 shares v1's unchanged images by hard links."""
    tmp = layout / f".layer-{seed}.tmp"
    raw_h = hashlib.sha256()
    gz_h = hashlib.sha256()

    class _Tee:
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def write(self, b: bytes) -> int:
            gz_h.update(b)
            return int(self.fh.write(b))

        def flush(self) -> None:
            self.fh.flush()

    import tarfile

    header = tarfile.TarInfo(f"data/{seed}.bin")
    header.size = size
    hdr = header.tobuf(format=tarfile.USTAR_FORMAT)
    with open(tmp, "wb") as fh:
        gz = gzip.GzipFile(fileobj=_Tee(fh), mode="wb", compresslevel=1, mtime=0)
        for chunk in (hdr,):
            raw_h.update(chunk)
            gz.write(chunk)
        left = size
        while left:
            n = min(left, 4 * MiB)
            chunk = os.urandom(n)
            raw_h.update(chunk)
            gz.write(chunk)
            left -= n
        tail = b"\0" * ((-size) % 512) + b"\0" * 1024
        raw_h.update(tail)
        gz.write(tail)
        gz.close()
    digest = "sha256:" + gz_h.hexdigest()
    dest = oci.blob_path(layout, digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return oci.Descriptor(oci.MT_LAYER_GZIP, digest, dest.stat().st_size), "sha256:" + raw_h.hexdigest()


def make_layout(layout: Path, *, images: int, layers: int, size: int, seed: int, only: int | None = None) -> list[str]:
    """``images`` images into ``layout`` (or just image ``only``, re-tagged, e.g. a changed version)."""
    oci.init_layout(layout)
    per_layer = max(size // (images * layers), 1024)
    refs = []
    for i in range(images):
        if only is not None and i != only:
            refs.append(f"registry.example.com/bench/img{i}:1.0")
            continue
        s = seed * 1000 + i * 100
        descs, diff_ids = [], []
        for j in range(layers):
            d, diff = _layer_blob(layout, s + j + 1, per_layer)
            descs.append(d)
            diff_ids.append(diff)
        config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        c = oci.write_blob(layout, json.dumps(config).encode(), oci.MT_CONFIG)
        m = {"schemaVersion": 2, "mediaType": oci.MT_MANIFEST, "config": c.to_json(),
             "layers": [d.to_json() for d in descs]}
        md = oci.write_blob(layout, json.dumps(m).encode(), oci.MT_MANIFEST)
        ref = f"registry.example.com/bench/img{i}:1.0"
        oci.tag(layout, md, ref)
        refs.append(ref)
    return refs


def make_profile(work: Path, refs: list[str]) -> Path:
    deploys = [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"d{i}", "namespace": "bench"},
                "spec": {"selector": {"matchLabels": {"a": f"d{i}"}}, "template": {
                    "metadata": {"labels": {"a": f"d{i}"}}, "spec": {"containers": [{"name": "c", "image": r}]}}}}
               for i, r in enumerate(refs)]
    doc = {"name": "bench", "tiers": {1: {}}, "compat": {"architectures": ["amd64"]}, "components": [
        {"name": "ns", "layer": 0, "tier": 1, "sources": [{"inline": "ns.yaml", "objects": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}]}]},
        {"name": "apps", "layer": 1, "tier": 1, "namespace": "bench", "dependsOn": ["ns"],
         "sources": [{"inline": "apps.yaml", "objects": deploys}]},
    ]}
    (work / "platform").mkdir(parents=True, exist_ok=True)
    path = work / "profile.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Registry:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = root / "config.yml"
        cfg.write_text(yaml.safe_dump({
            "version": 0.1, "log": {"level": "error"},
            "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}"}}))
        self.proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("registry did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def push_ours(url: str, layout: Path) -> tuple[float, Any]:
    t = pusher.Target(url=url)

    async def go() -> Any:
        rep = await pusher.push(t, layout)
        problems = await pusher.verify(t, rep.pushed)
        assert not problems, problems
        return rep

    t0 = time.perf_counter()
    rep = asyncio.run(go())
    return time.perf_counter() - t0, rep


def push_skopeo(port: int, layout: Path, refs: list[str]) -> float:
    t0 = time.perf_counter()
    for r in refs:
        ref = bundle_images.parse_ref(r)
        subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{ref}",
                        f"docker://127.0.0.1:{port}/{pusher.repo_for(ref, 'prefixed')}:{ref.tag}"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512, help="total image bytes (default 512)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4, help="layers per image")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--workdir", help="default: a temp dir under /tmp (removed)")
    args = ap.parse_args()
    for tool in ("skopeo", "docker-registry"):
        if not shutil.which(tool):
            print(f"bench/images.py: {tool} is not installed", file=sys.stderr)
            return 2
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-images-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        size = args.size_mib * MiB
        t0 = time.perf_counter()
        src1, src2 = tmp / "src1", tmp / "src2"
        refs = make_layout(src1, images=args.images, layers=args.layers, size=size, seed=1)
        shutil.copytree(src1, src2, copy_function=os.link)  # v2: the same images but one
        make_layout(src2, images=args.images, layers=args.layers, size=size, seed=2, only=0)
        gen = time.perf_counter() - t0
        key = keys.generate()
        root = trust.make_root(release=[key.public_key()], threshold=1,
                               expires=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        prof = make_profile(tmp / "w", refs)

        def bundle(out: Path, src: Path, release: int, base: Path | None = None) -> Path:
            opts = bundle_images.Options(source=f"oci:{src}", arches=("amd64",), base=base)
            build.build(profile=prof, platform=tmp / "w" / "platform", mirror=None, out=out, version=f"{release}.0.0",
                        release=release, keys=[key], images=opts, compression="none")
            return out

        t0 = time.perf_counter()
        v1 = bundle(tmp / "v1.efb", src1, 1)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        staged = verify.verify_and_stage(v1, root=root, store_dir=tmp / "store")
        t_stage = time.perf_counter() - t0
        layout = staged.payload_dir / "images"
        image_bytes = sum(f.size for f in staged.manifest.files if f.path.startswith("images/blobs/"))

        ours, theirs = [], []
        rep: Any = None
        for run in range(args.runs):
            for which in (("ours", "skopeo") if run % 2 == 0 else ("skopeo", "ours")):
                reg = Registry(tmp / f"reg-{which}-{run}")
                try:
                    if which == "ours":
                        secs, rep = push_ours(f"http://127.0.0.1:{reg.port}", layout)
                        ours.append(secs)
                    else:
                        theirs.append(push_skopeo(reg.port, layout, refs))
                finally:
                    reg.stop()
                shutil.rmtree(tmp / f"reg-{which}-{run}", ignore_errors=True)

        full2 = bundle(tmp / "v2-full.efb", src2, 2)
        delta2 = bundle(tmp / "v2-delta.efb", src2, 2, base=v1)
        a, b = min(ours), min(theirs)
        mib = image_bytes / MiB
        print(f"images: {args.images} x {args.layers} layers, {mib:.0f} MiB of blobs "
              f"(generated in {gen:.1f} s; bundle built in {t_build:.1f} s, verified+staged in {t_stage:.1f} s)")
        print(f"(a) edgefleet registry loader push+verify: {a:.2f} s ({mib / a:.0f} MiB/s)  runs: "
              + ", ".join(f"{x:.2f}" for x in ours))
        print(f"(b) skopeo copy oci: -> docker://      : {b:.2f} s ({mib / b:.0f} MiB/s)  runs: "
              + ", ".join(f"{x:.2f}" for x in theirs))
        print(f"ratio (a)/(b): {a / b:.2f}x (target <= 1.2x); blobs uploaded {rep.blobs_uploaded}, "
              f"manifests {rep.manifests}")
        fs, ds = full2.stat().st_size, delta2.stat().st_size
        print(f"delta bundle (1 of {args.images} images changed): {ds / MiB:.1f} MiB vs full {fs / MiB:.1f} MiB "
              f"= {ds / fs:.3f} of the full bundle")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
