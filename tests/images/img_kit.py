"""Helpers for the image tests: synthetic OCI images, a small profile, bundles, a real local registry."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brokers
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundles import build, keys, oci, trust
from bundles import images as bundle_images

NOW = dt.datetime.now(dt.UTC)

APP = "registry.example.com/team/app:1.0"
TOOL = "busybox:1.36"
WIDGET = "quay.io/acme/widget:2.1"


def layer(seed: int, size: int) -> bytes:
    """An uncompressed tar with ``size`` bytes of incompressible content (seeded: reproducible)."""
    rnd = __import__("random").Random(seed)
    return oci.tar_layer({f"data/{seed}.bin": rnd.randbytes(size)})


def make_source(layout: Path, *, app_seed: int = 1, size: int = 64 * 1024,
                arm_tools: bool = True) -> dict[str, oci.Descriptor]:
    """Three images: APP multi-arch (amd64+arm64, sharing a base layer with TOOL), TOOL, WIDGET.

    TOOL and WIDGET are single-arch amd64 unless ``arm_tools`` (then multi-arch too)."""
    base = layer(100, size)
    amd = oci.add_image(layout, layers=[base, layer(app_seed * 10 + 1, size), layer(app_seed * 10 + 2, size)])
    arm = oci.add_image(layout, layers=[base, layer(app_seed * 10 + 3, size)], arch="arm64")
    app = oci.add_index(layout, [amd, arm], ref=APP)
    tool = oci.add_image(layout, layers=[base, layer(200, size)], ref=bundle_images.normalize(TOOL))
    widget = oci.add_image(layout, layers=[layer(300, size)], ref=WIDGET)
    if arm_tools:
        tool = oci.add_index(layout, [tool, oci.add_image(layout, layers=[layer(201, size)], arch="arm64")],
                             ref=bundle_images.normalize(TOOL))
        widget = oci.add_index(layout, [widget, oci.add_image(layout, layers=[layer(301, size)], arch="arm64")],
                               ref=WIDGET)
    return {"app": app, "app-amd64": amd, "app-arm64": arm, "tool": tool, "widget": widget}


def _deploy(name: str, image: str) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "demo"},
            "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": name, "image": image}]}}}}


def profile(tmp: Path, *, app_image: str = APP) -> Path:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "widgets.example.io"},
           "spec": {"group": "example.io", "scope": "Namespaced",
                    "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
                    "versions": [{"name": "v1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {"type": "object",
                                                                 "x-kubernetes-preserve-unknown-fields": True}}}]}}
    cron = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "tick", "namespace": "demo"},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "t", "image": TOOL}]}}}}}}
    widget = {"apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "demo"},
              "spec": {"image": WIDGET}}
    doc = {
        "name": "demo", "tiers": {1: {}, 4: {}},
        "compat": {"architectures": ["amd64", "arm64"]},
        "imageFields": [{"kind": "Widget", "group": "example.io", "path": "spec.image"}],
        "components": [
            {"name": "base", "layer": 0, "tier": 1, "sources": [{"inline": "base.yaml", "objects": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}, crd]}]},
            {"name": "app", "layer": 1, "tier": 1, "namespace": "demo", "dependsOn": ["base"],
             "sources": [{"inline": "app.yaml", "objects": [_deploy("app", app_image), cron]}]},
            {"name": "extra", "layer": 2, "tier": 4, "namespace": "demo", "dependsOn": ["base"],
             "sources": [{"inline": "extra.yaml", "objects": [_deploy("helper", TOOL), widget]}]},
        ],
    }
    path = tmp / "profile.yaml"
    path.write_text(yaml.safe_dump(doc))
    (tmp / "platform").mkdir(exist_ok=True)
    return path


@dataclass
class Signer:
    tmp: Path
    key: Ed25519PrivateKey = field(default_factory=keys.generate)

    def __post_init__(self) -> None:
        self.root = trust.make_root(release=[self.key.public_key()], threshold=1, expires=NOW + dt.timedelta(days=30))
        self.root_path = self.tmp / "root.json"
        trust.save_root(self.root_path, trust.sign_root(self.root, keys=[self.key]).to_json())

    def build(self, out: Path, *, source: Path | None, release: int = 1, version: str = "1.0.0",
              base: Path | None = None, arches: tuple[str, ...] = ("amd64", "arm64"),
              app_image: str = APP) -> build.BuildResult:
        work = self.tmp / f"prof-{out.stem}"
        work.mkdir(exist_ok=True)
        opts = None if source is None else bundle_images.Options(source=f"oci:{source}", arches=arches, base=base)
        return build.build(profile=profile(work, app_image=app_image), platform=work / "platform", mirror=None,
                           out=out, version=version, release=release, keys=[self.key], images=opts,
                           created=NOW - dt.timedelta(minutes=10) + dt.timedelta(seconds=release),
                           compression="none")


# --- a real registry (Debian's docker-registry, the CNCF distribution registry) -----------------------


class Registry:
    """docker-registry on a free loopback port, storage in ``root``; delete enabled; restartable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = brokers.free_port()
        self.storage = root / "storage"
        self.config = root / "config.yml"
        self.config.write_text(yaml.safe_dump({
            "version": 0.1, "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, urllib.error.URLError), \
                    urllib.request.urlopen(self.url + "/v2/", timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def blobs(self) -> set[str]:
        """Every blob digest in the registry's storage (what garbage-collect leaves)."""
        d = self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
        return {"sha256:" + p.name for p in d.glob("*/*") if (p / "data").is_file()} if d.is_dir() else set()

    def catalog(self) -> list[str]:
        d = self.storage / "docker" / "registry" / "v2" / "repositories"
        return sorted(str(p.parent.relative_to(d)) for p in d.rglob("_manifests")) if d.is_dir() else []


@contextlib.contextmanager
def registry(root: Path) -> Iterator[Registry]:
    root.mkdir(parents=True, exist_ok=True)
    reg = Registry(root)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def skopeo_inspect(ref: str) -> dict[str, Any]:
    import json

    proc = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"skopeo inspect {ref} failed: {proc.stderr.strip()}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def have_tools() -> bool:
    return bool(shutil.which("skopeo") and shutil.which("docker-registry")) and os.name == "posix"


# --- agent side ------------------------------------------------------------------------------------


def agent_ctx(tmp: Path, *, loader: str = "registry", reg: Registry | None = None, kubeconfig: Path | None = None,
              **images: Any) -> Any:
    from agent import outbox
    from agent.config import AgentConfig
    from agent.context import AgentContext
    from agent.install import journal
    from agent.state import StateStore

    cfg_images: dict[str, Any] = {"backoff_max_seconds": 1.0}
    if reg is not None:
        cfg_images.update(registry_url=reg.url, gc=True,
                          gc_command=["docker-registry", "garbage-collect", str(reg.config)])
    cfg_images.update(images)
    cfg = AgentConfig(site_id="site-1", state_dir=tmp / "state", trust_dir=tmp, kubeconfig=kubeconfig,
                      install={"image_loader": loader, "default_gate_timeout_seconds": 60}, images=cfg_images)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = StateStore.open(cfg.state_dir)
    outbox.setup(store)
    journal.setup(store)
    return AgentContext(config=cfg, store=store)


def spec_of(staged: Any) -> Any:
    from agent.install import source

    return source.load_spec(manifest_json=(staged.path / "manifest.json").read_text(), bundle_id=staged.bundle_id,
                            path=str(staged.path), default_timeout=60)


def events_of(ctx: Any, type_: str) -> list[dict[str, Any]]:
    import json

    rows = ctx.store.db.execute("SELECT payload FROM outbox").fetchall()
    out = []
    for r in rows:
        doc = json.loads(r["payload"])
        if doc.get("type") == type_:
            out.append(doc)
    return out
